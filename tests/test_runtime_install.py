"""The runtime extra alone (no torch, no transformers) runs `embed --bundle` and `topk`.

Installs this checkout with ``[runtime]`` into a fresh virtual environment (from the package
registry: onnxruntime, numpy, pillow, tokenizers, click, tqdm) and compares what that
environment writes with the full installation's output on the same bundle.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from cliper_prod.commands import cli

REPO = Path(__file__).resolve().parents[1]


def test_runtime_extra_without_torch(exported: dict[str, Path], tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                              f"{REPO}[runtime]"], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print("
                            "[m for m in ('torch', 'transformers', 'onnx') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"
    tool = str(venv / "bin" / "cliper-prod")
    bundle = str(exported["bundle"])
    users = tmp_path / "u.txt"
    users.write_text("\n".join((exported["bundle"] / "user_ids.txt").read_text().split()[:9]))
    lean = subprocess.run([tool, "topk", "--users", str(users), "--bundle", bundle, "-k", "10",
                           "--out", str(tmp_path / "lean.jsonl")], capture_output=True, text=True)
    assert lean.returncode == 0, lean.stderr
    res = CliRunner().invoke(cli, ["topk", "--users", str(users), "--bundle", bundle, "-k",
                                   "10", "--out", str(tmp_path / "full.jsonl")])
    assert res.exit_code == 0
    assert (tmp_path / "lean.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()

    items = str(exported["policy_items"])
    lean = subprocess.run([tool, "embed", items, "--bundle", bundle, "--out",
                           str(tmp_path / "lean"), "--quiet"], capture_output=True, text=True)
    assert lean.returncode == 0, lean.stderr
    res = CliRunner().invoke(cli, ["embed", items, "--bundle", bundle, "--out",
                                   str(tmp_path / "full"), "--quiet"])
    assert res.exit_code == 0
    for name in ("item_ids.txt", "errors.jsonl"):
        assert (tmp_path / "lean" / name).read_text() == (tmp_path / "full" / name).read_text()
    for name in ("image_feat.npy", "text_feat.npy"):
        np.testing.assert_allclose(np.load(tmp_path / "lean" / name),
                                   np.load(tmp_path / "full" / name), atol=1e-5)
