"""Progress off a terminal (periodic log lines with count, total, rate and ETA) and on one (a
bar with its total), through the real CLI with stderr a pipe or a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from cliper_prod import progress
from cliper_prod.progress import LogProgress

#: a periodic line: "desc: n/total unit (p%), rate unit/s, elapsed m:ss[, ETA m:ss]"
LINE = r"(?m)^{desc}: (\d+)/(\d+) {unit} \((\d+)%\), [\d.e+]+ {unit}/s, elapsed \d+:\d\d"


def cli(*args: object, interval: str | None = "0.002", cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    """The CLI in a child process, stdout and stderr pipes (not a terminal)."""
    env = {**os.environ}
    env.pop(progress.INTERVAL_ENV, None)
    if interval is not None:
        env[progress.INTERVAL_ENV] = interval
    return subprocess.run([sys.executable, "-m", "cliper_prod", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def periodic(stderr: str, desc: str, unit: str) -> list[tuple[int, int]]:
    """(count, total) of each periodic line of ``desc`` in ``stderr``."""
    pattern = LINE.format(desc=re.escape(desc), unit=unit)
    return [(int(n), int(total)) for n, total, _ in re.findall(pattern, stderr)]


def test_a_log_line_reads_count_total_rate_and_eta(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = LogProgress(desc="embed", unit="item", total=120, interval=3600)
    now[0] += 10.0
    bar.update(30)
    # 30 items in 10 s: 3/s; 90 left: 30 s
    assert bar.line() == "embed: 30/120 item (25%), 3 item/s, elapsed 0:10, ETA 0:30"
    bar.set_postfix(loss="0.5")
    assert bar.line().endswith("ETA 0:30, loss=0.5")
    unknown = LogProgress(desc="x", unit="row", interval=3600, initial=5)
    now[0] += 4.0
    unknown.update(8)
    assert unknown.line() == "x: 13 row, 2 row/s, elapsed 0:04"  # resumed rows not in the rate
    bar.close()
    unknown.close()


def test_the_interval_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    assert progress.log_interval() == progress.DEFAULT_INTERVAL_S
    monkeypatch.setenv(progress.INTERVAL_ENV, "2.5")
    assert progress.log_interval() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(progress.INTERVAL_ENV, bad)
        with pytest.raises(progress.ConfigError, match=progress.INTERVAL_ENV):
            progress.log_interval()


@pytest.fixture(scope="module")
def users_file(exported, tmp_path_factory) -> Path:
    ids = (exported["bundle"] / "user_ids.txt").read_text().split()
    path = tmp_path_factory.mktemp("progress") / "users.txt"
    path.write_text("".join(f"{u}\n" for u in ids))
    return path


def test_topk_off_a_terminal_logs_progress_lines_and_quiet_silences_them(exported, users_file
                                                                          ) -> None:
    n_users = len(users_file.read_text().split())
    args = ("topk", "--bundle", exported["bundle"], "--users", users_file, "-k", 5,
            "--batch-size", 1)
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    lines = periodic(res.stderr, "topk", "user")
    assert lines, res.stderr
    assert all(total == n_users and 0 <= n <= n_users for n, total in lines)
    assert re.search(rf"(?m)^topk: {n_users}/{n_users} user \(100%\), .* \(done\)$", res.stderr)
    assert len(res.stdout.splitlines()) == n_users  # progress never reaches stdout
    quiet = cli(*args, "-q")
    assert quiet.returncode == 0 and quiet.stdout == res.stdout
    assert "topk:" not in quiet.stderr
    # the default interval (30 s) writes no line in a run this short
    default = cli(*args, interval=None)
    assert default.returncode == 0 and "topk:" not in default.stderr


def test_embed_logs_progress_with_the_catalog_total(exported, tmp_path) -> None:
    items = exported["catalog"] / "items.jsonl"
    total = sum(1 for line in items.read_text().splitlines())
    res = cli("embed", items, "--bundle", exported["bundle"], "--out", tmp_path / "f",
              "--batch-size", 4)
    assert res.returncode == 0, res.stderr
    lines = periodic(res.stderr, "embed", "item")
    assert lines and all(t == total for _, t in lines), res.stderr
    assert re.search(rf"(?m)^embed: {total}/{total} item \(100%\).*\(done\)$", res.stderr)


def test_export_and_add_items_log_their_steps(exported, tmp_path) -> None:
    res = cli("export", "--checkpoint", exported["ckpt"], "--out", tmp_path / "b", "--no-fp16",
              "--no-torchscript", "--no-fused", "--no-gpu-form", "--max-k", 20)
    assert res.returncode == 0, res.stderr
    steps = periodic(res.stderr, "export", "step")
    assert steps and all(total == 3 for _, total in steps), res.stderr
    assert "export: 3/3 step (100%)" in res.stderr
    feats = exported["catalog"] / "cliper"
    ids = (feats / "item_ids.txt").read_text().split()[:3]
    new = tmp_path / "new"
    new.mkdir()
    (new / "item_ids.txt").write_text("".join(f"NEW{n}\n" for n in range(3)))
    import numpy as np

    for name in ("image_feat.npy", "text_feat.npy"):
        np.save(new / name, np.load(feats / name)[:len(ids)])
    res = cli("add-items", "--bundle", tmp_path / "b", "--features", new, "--out",
              tmp_path / "b2")
    assert res.returncode == 0, res.stderr
    assert "added 3 item(s)" in res.stderr
    assert "export: 3/3 step (100%)" in res.stderr  # the new bundle's export, reported


def test_train_logs_batches_within_an_epoch(toy_dataset, tmp_path) -> None:
    settings = ("--set", "train.epochs=1", "--set", "train.batch_size=8", "--set",
                "train.topk=[5]", "--set", "train.valid_metric=recall@5")
    res = cli("train", "--data", toy_dataset, "--out", tmp_path / "ck", *settings)
    assert res.returncode == 0, res.stderr
    lines = periodic(res.stderr, "epoch 0", "batch")
    assert lines and len({t for _, t in lines}) == 1, res.stderr
    quiet = cli("train", "--data", toy_dataset, "--out", tmp_path / "ck2", *settings, "-q")
    assert quiet.returncode == 0 and "epoch 0:" not in quiet.stderr


def test_on_a_terminal_embed_draws_a_bar_with_total_and_eta(exported, tmp_path) -> None:
    """stderr a pseudo-terminal: tqdm's bar, with the catalog's total, instead of log lines."""
    items = exported["catalog"] / "items.jsonl"
    total = sum(1 for _ in items.read_text().splitlines())
    primary, secondary = pty.openpty()
    # a terminal's size, as a real one has (tqdm sizes its bar to it; 0 columns draw nothing)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "cliper_prod", "embed", str(items),
                             "--bundle", str(exported["bundle"]), "--out", str(tmp_path / "f")],
                            stdout=subprocess.PIPE, stderr=secondary, env={
                                **os.environ, progress.INTERVAL_ENV: "0.002"})
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 0
    os.close(primary)
    screen = b"".join(chunks).decode(errors="replace")
    assert re.search(rf"embed: +100%\|.*\| {total}/{total} \[", screen), screen
    assert not periodic(screen, "embed", "item")  # no log lines on a terminal
    assert json.loads((tmp_path / "f" / "embed_summary.json").read_text())["embedded"] > 0
