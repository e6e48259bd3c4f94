"""`add-items` on a host without torch: the CLI run in a subprocess where importing torch (and,
for the last test, onnx) fails; the new bundle verifies, ranks as naive numpy over its tables
does and as the bundle re-exported with torch does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cliper_prod.bundle_format import read_manifest
from cliper_prod.commands import cli
from conftest import ranked_as_naive_numpy
from tests.test_fold_in import N_NEW, new_features

REPO = Path(__file__).resolve().parents[1]
#: Runs the CLI with ``blocked`` top-level modules unimportable, as on a host without them.
WITHOUT = """
import sys
blocked = set(sys.argv[1].split(","))

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
from cliper_prod.commands import main
sys.argv = ["cliper-prod", *sys.argv[2:]]
try:
    main()
finally:
    assert "torch" not in sys.modules, "torch imported"
"""


def without(blocked: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, blocked, *map(str, args)],
                          capture_output=True, text=True, cwd=REPO)


def topk_all(bundle: Path, tmp_path: Path, k: int = 10) -> list[dict]:
    users = tmp_path / f"{bundle.name}.users.txt"
    users.write_text((bundle / "user_ids.txt").read_text())
    out = tmp_path / f"{bundle.name}.recs.jsonl"
    res = CliRunner().invoke(cli, ["topk", "--bundle", str(bundle), "--users", str(users),
                                   "-k", str(k), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_features_are_added_without_torch(exported: dict[str, Path], tmp_path: Path) -> None:
    new_features(tmp_path / "new", exported["catalog"])
    lean = without("torch", "add-items", "--bundle", exported["bundle"], "--features",
                   tmp_path / "new", "--out", tmp_path / "lean", "--quiet")
    assert lean.returncode == 0, lean.stderr
    manifest = read_manifest(tmp_path / "lean")  # every hash checked
    topk = manifest["graphs"]["topk"]
    assert manifest["versions"]["torch"] is None and manifest["lineage"]["added_items"] == N_NEW
    assert topk["n_items"] == 60 + N_NEW and set(topk["files"]) == {"fp32"}
    assert topk["table_swapped"]["left_out"] == ["gpu", "torchscript"]
    assert topk["parity"]["onnx_fp32"]["min_cosine"] > 0.99999
    assert not (tmp_path / "lean" / "topk.gpu.onnx").exists()
    assert manifest["graphs"]["image_encoder"] == \
        read_manifest(exported["bundle"])["graphs"]["image_encoder"]  # CLIP graphs copied

    # naive numpy over the extended tables, training items out
    got = topk_all(tmp_path / "lean", tmp_path)
    folder = tmp_path / "lean"
    assert ranked_as_naive_numpy(folder, got) > 0

    # the same items added with torch (top-K graph re-exported): the same tables and answers
    res = CliRunner().invoke(cli, ["add-items", "--bundle", str(exported["bundle"]),
                                   "--features", str(tmp_path / "new"), "--out",
                                   str(tmp_path / "full"), "--quiet"])
    assert res.exit_code == 0, res.output
    for name in ("item_embeddings.npy", "item_ids.txt", "history_items.npy"):
        assert (tmp_path / "full" / name).read_bytes() == (folder / name).read_bytes(), name
    assert topk_all(tmp_path / "full", tmp_path) == got


def test_items_are_embedded_and_added_without_torch(exported: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """--items runs the bundle's ONNX CLIP graphs: no torch there either."""
    lean = without("torch", "add-items", "--bundle", exported["bundle"], "--items",
                   exported["policy_items"], "--out", tmp_path / "lean", "--quiet")
    assert lean.returncode == 0, lean.stderr
    manifest = read_manifest(tmp_path / "lean")
    assert manifest["lineage"]["added_items"] == manifest["graphs"]["topk"]["n_items"] - 60 > 0


def test_without_torch_or_onnx_one_line_names_the_extra(exported: dict[str, Path],
                                                        tmp_path: Path) -> None:
    new_features(tmp_path / "new", exported["catalog"])
    lean = without("torch,onnx", "add-items", "--bundle", exported["bundle"], "--features",
                   tmp_path / "new", "--out", tmp_path / "lean", "--quiet")
    assert lean.returncode == 2, lean.stderr
    lines = lean.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cliper-prod[export]'" in lines[0], lean.stderr
    assert not (tmp_path / "lean").exists()
