"""Image decoding in worker processes (``embed --decoders processes``), through the real CLI:
the same output bytes as decoding threads, the per-item policy and ``--strict`` unchanged, a
SIGKILLed decode worker reported with nothing lost, and Ctrl-C, SIGTERM or a kill of the run
leaving no worker process and no shared-memory block behind, the run resumable to the same
bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.commands import cli
from cliper_prod.features.decoders import ATTEMPTS, SHM_PREFIX, ProcessDecoders
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.items import Item
from tests.test_decode_paths import write_jpegs
from tests.test_reliability import _bad_catalog

TOOL = [sys.executable, "-m", "cliper_prod"]
FINALS = ("image_feat.npy", "text_feat.npy", "item_ids.txt", "errors.jsonl", "embed_summary.json")
SHM = Path("/dev/shm")


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if entry.name.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def decode_workers(pid: int) -> list[int]:
    """The decode worker processes of the run ``pid`` (multiprocessing's resource tracker is a
    child too, and is not one)."""
    return [c for c in children(pid)
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def blocks(pid: int) -> list[str]:
    return [p.name for p in SHM.glob(f"{SHM_PREFIX}{pid}-*")]


def default_sigint() -> None:
    """Ctrl-C as a terminal's foreground job gets it, even when these tests run in a background
    job (which starts with SIGINT ignored, and a child inherits that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory) -> Path:
    """96 items over 4 distinct 1600x1200 photo-like JPEGs: decoding them (full size, the exact
    path) takes long enough for a signal to land mid-run."""
    folder = tmp_path_factory.mktemp("big_jpegs")
    write_jpegs(folder / "img", [(1600, 1200)] * 4, seed=7)
    with open(folder / "items.jsonl", "w") as fh:
        for i in range(96):
            fh.write(json.dumps({"item_id": f"B{i}", "title": f"item {i}", "brand": "acme",
                                 "image": f"img/j{i % 4}.jpg"}) + "\n")
    return folder / "items.jsonl"


@pytest.fixture(scope="module")
def reference(exported: dict[str, Path], big_jpegs: Path, tmp_path_factory) -> Path:
    """``big_jpegs`` embedded with one decoding thread, nothing interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    in_process(*cli_embed(big_jpegs, exported["bundle"], out, "--workers", "1"))
    return out


def cli_embed(items: Path, bundle: Path, out: Path, *args: str) -> list[str]:
    return ["embed", str(items), "--bundle", str(bundle), "--out", str(out), "--quiet",
            "--batch-size", "4", "--shard-items", "4", *args]


def in_process(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == code, res.output
    return res.output


def same_outputs(a: Path, b: Path) -> None:
    for name in FINALS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_policy_and_strict_are_unchanged_with_worker_processes(exported: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Every per-item case (unreadable, missing, truncated, bomb, every image mode...) gives the
    same errors.jsonl and the same features with processes as with threads."""
    items, _ = _bad_catalog(tmp_path / "bad")
    limits = ("--max-image-pixels", "1000000", "--max-line-bytes", "60000", "--save-views")
    for kind in ("threads", "processes"):
        in_process(*cli_embed(items, exported["bundle"], tmp_path / kind, *limits, "--workers",
                              "2", "--decoders", kind))
    same_outputs(tmp_path / "threads", tmp_path / "processes")
    kept = [e for e in map(json.loads, (tmp_path / "processes" / "errors.jsonl").open())
            if e["action"] == "kept"]
    assert {"image not found", "not a readable image", "over the limit"} <= {
        fragment for e in kept for fragment in ("image not found", "not a readable image",
                                                "over the limit") if fragment in e["reason"]}
    strict = CliRunner().invoke(cli, cli_embed(items, exported["bundle"], tmp_path / "strict",
                                               "--strict", "--decoders", "processes"))
    assert strict.exit_code == 3 and strict.stderr.startswith(f"error: {items}:2: malformed")
    assert not (tmp_path / "strict" / "image_feat.npy").exists()


def test_a_sigkilled_decode_worker_is_reported_and_nothing_is_lost(
        exported: dict[str, Path], big_jpegs: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    proc = subprocess.Popen([*TOOL, *cli_embed(big_jpegs, exported["bundle"], out, "--workers",
                                               "2", "--decoders", "processes")],
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: len(list(out.glob(".embed-work/shard-*.npz"))) >= 1)
    workers = decode_workers(proc.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"pid {workers[0]}) died (killed by signal 9)" in stderr
    assert not (out / ".embed-work").exists()
    same_outputs(reference, out)  # every item, every byte, no error listed
    assert (out / "errors.jsonl").read_text() == ""


def test_interrupted_or_killed_runs_leave_nothing_behind_and_resume(
        exported: dict[str, Path], big_jpegs: Path, reference: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it), SIGTERM and SIGKILL
    mid-run: no decode worker survives and no shared-memory block is left; the resumed run
    writes the bytes of an uninterrupted one."""
    out = tmp_path / "out"
    args = cli_embed(big_jpegs, exported["bundle"], out, "--workers", "2", "--decoders",
                     "processes")
    for stop, code in [("SIGINT", 130), ("SIGTERM", 143), ("SIGKILL", -9)]:
        done = len(list(out.glob(".embed-work/shard-*.npz")))
        proc = subprocess.Popen([*TOOL, *args, *(["--resume"] if done else [])],
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=default_sigint)
        assert wait_for(lambda: len(list(out.glob(".embed-work/shard-*.npz"))) > done
                        and len(decode_workers(proc.pid)) == 2)
        workers = decode_workers(proc.pid)
        if stop == "SIGINT":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, getattr(signal, stop))
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == code, stderr
        assert "Traceback" not in stderr
        # gone at once after a clean exit; after a kill the workers see their pipe close and
        # the resource tracker unlinks the block
        assert wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers),
                        timeout=0.5 if code > 0 else 10)
        assert wait_for(lambda: not blocks(proc.pid), timeout=0.5 if code > 0 else 10)
        assert not (out / "image_feat.npy").exists()
    in_process(*args, "--resume")
    same_outputs(reference, out)


def test_an_image_that_kills_its_worker_twice_is_reported_not_retried_forever(
        tmp_path: Path) -> None:
    """The second death on one image makes the death its decode error (the per-item policy
    then lists it); the workers go on with the next images, from a path or from bytes."""
    path = write_jpegs(tmp_path, [(3000, 2000)], seed=9)[0]  # long enough to kill it at work
    item = Item("I1", {}, path, 1, image_name="j0.jpg")
    pool = ProcessDecoders(ClipImagePreprocessor(size=32, crop=32), workers=1)
    try:
        future = pool.submit(item)
        pid = None
        for _ in range(ATTEMPTS):  # each time, the worker that holds the image
            assert wait_for(lambda: pool.workers[0].process.pid != pid
                            and pool.workers[0].started and pool.workers[0].held)
            pid = pool.workers[0].process.pid
            os.kill(pid, signal.SIGKILL)
        got = future.result(timeout=60)
        assert got == "image decoder process died (killed by signal 9) on it twice: j0.jpg"
        small = write_jpegs(tmp_path / "s", [(64, 48)], seed=1)[0]
        expected = ClipImagePreprocessor(size=32, crop=32).load(small, uint8=True)
        assert np.array_equal(pool.submit(Item("I2", {}, small, 2)).result(timeout=60), expected)
        # a Parquet row's encoded bytes travel to the worker instead of a path
        row = Item("I3", {}, None, 3, image_name="row 3", image_bytes=small.read_bytes())
        assert np.array_equal(pool.submit(row).result(timeout=60), expected)
    finally:
        pool.close()
    assert not blocks(os.getpid())
