"""Bad inputs, strictness, limits, kill-and-resume: what the package does with inputs nobody
planned for. Each case asserts the message and the exit code against hand-written expectations."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cliper_prod.commands import cli
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.items import Item, ItemError, ItemLimits, parse_item, read_items
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.pipeline import catalog_texts
from cliper_prod import training
from tests.conftest import toy_rows, write_inter

TOOL = [sys.executable, "-m", "cliper_prod"]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reliability")
    catalog = root / "catalog"
    generate_catalog(catalog, SyntheticSpec(n_users=40, n_items=150, seed=5))
    clip = build_tiny_clip(root / "clip", catalog_texts(catalog) + ["word"])
    return {"root": root, "catalog": catalog, "clip": clip}


def _image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), **save) -> str:
    colour = {"RGB": (200, 30, 30), "RGBA": (0, 0, 255, 128), "CMYK": (0, 200, 200, 0),
              "L": 128, "P": 3, "I;16": 40000}[mode]
    Image.new(mode, size, colour).save(path, **save)
    return path.name


def _bad_catalog(folder: Path) -> tuple[Path, dict[int, tuple[str, str]]]:
    """One line per case, with the (action, reason fragment) expected for it."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _image(folder / "good.png")
    exif = Image.new("RGB", (40, 20), (10, 200, 10))
    info = exif.getexif()
    info[0x0112] = 6  # rotated 90 degrees
    exif.save(folder / "exif.jpg", exif=info.tobytes())
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    _image(folder / "whole.jpg", size=(400, 300), format="JPEG")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:300])
    Image.new("1", (5000, 5000)).save(folder / "bomb.png")  # 25 Mpixel, a few kB on disk
    item = lambda i, **kw: json.dumps({"item_id": f"I{i}", "title": "red bottle", **kw})
    cases: list[tuple[bytes | str, tuple[str, str] | None]] = [
        (item(0, image=good), None),
        ("{not json", ("skipped", "malformed JSON")),
        (b'{"item_id": "X", "title": "caf\xe9"}', ("skipped", "not UTF-8")),
        (json.dumps({"title": "no id"}), ("skipped", "missing or empty 'item_id'")),
        (item(0, image=good), ("skipped", "duplicate 'item_id'")),
        (json.dumps({"item_id": "T", "title": 5}), ("skipped", "'title' must be a string")),
        (json.dumps({"item_id": "C", "categories": [1]}), ("skipped", "entries must be strings")),
        (json.dumps({"item_id": "W", "title": "   ", "image": good}),
         ("kept", "no text field")),
        (json.dumps({"item_id": "W2", "title": " \t "}), ("skipped", "and no text")),
        (item(1, description="word " * 10_000, image=good), ("kept", "cut from 49,999 to 20,000")),  # trailing space stripped
        (item(2, image="missing.png"), ("kept", "image not found")),
        (item(3, image="text.png"), ("kept", "not a readable image")),
        (item(4, image="truncated.jpg"), ("kept", "not a readable image")),
        (item(5, image="empty.png"), ("kept", "image file is empty")),
        (item(6, image="bomb.png"), ("kept", "over the limit of 1,000,000")),
        (item(7, image=5), ("skipped", "'image' must be a non-empty path string")),
        ("[1, 2]", ("skipped", "expected a JSON object")),
        (item(8, extra="x" * 70_000), ("skipped", "line longer than 60,000 bytes")),
    ]
    for i, mode in enumerate(("CMYK", "P", "I;16", "L", "RGBA")):
        name = _image(folder / f"mode-{i}.png" if mode != "CMYK" else folder / "cmyk.jpg", mode)
        cases.append((item(20 + i, image=name), None))
    cases.append((item(30, image="exif.jpg"), None))
    lines = [c if isinstance(c, bytes) else c.encode() for c, _ in cases]
    (folder / "items.jsonl").write_bytes(b"\n".join(lines) + b"\n\n")
    expected = {i + 1: e for i, (_, e) in enumerate(cases) if e is not None}
    return folder / "items.jsonl", expected


def test_every_bad_item_is_reported_with_its_reason(small: dict[str, Path],
                                                     tmp_path: Path) -> None:
    items, expected = _bad_catalog(tmp_path / "bad")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["embed", str(items), "--clip", str(small["clip"]), "--out",
                                   str(out), "--quiet", "--max-image-pixels", "1000000",
                                   "--max-line-bytes", "60000", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["line"] for e in errors] == sorted(expected)  # one record per bad line, in order
    for e in errors:
        action, fragment = expected[e["line"]]
        assert e["action"] == action and fragment in e["reason"], e
    ids = (out / "item_ids.txt").read_text().split()
    kept = sum(a == "kept" for a, _ in expected.values())
    assert len(ids) == 1 + kept + 6  # the good item, the kept ones, every image mode
    assert {"I20", "I21", "I22", "I23", "I24", "I30"} <= set(ids)
    summary = json.loads((out / "embed_summary.json").read_text())
    assert summary["skipped"] == sum(a == "skipped" for a, _ in expected.values())
    assert np.isfinite(np.load(out / "image_feat.npy")).all()


def test_strict_fails_at_the_first_item_error_and_writes_nothing(small: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    items, _ = _bad_catalog(tmp_path / "bad")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["embed", str(items), "--clip", str(small["clip"]), "--out",
                                   str(out), "--quiet", "--strict"])
    assert res.exit_code == 3
    assert res.stderr.startswith(f"error: {items}:2: malformed JSON")
    assert "--strict" in res.stderr and "Traceback" not in res.output
    assert not out.exists()  # the folder this run created is removed again


@pytest.mark.parametrize("rows, header, fragment", [
    ([(0, 0, 0), (0, "x", 0)], None, ":3: column 'itemID' must be an integer"),
    ([(0, 0, 0), (0, 1, 9)], None, ":3: unknown x_label 9"),
    ([(0, 0, 0)], "userID\titemID", ":1: header lacks column(s) x_label"),
])
def test_bad_inter_rows_exit_3_with_file_and_line(tmp_path: Path, rows, header,
                                                  fragment: str) -> None:
    write_inter(tmp_path / "d", rows, header=header or "userID\titemID\tx_label")
    res = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "d"), "--quiet"])
    assert res.exit_code == 3 and fragment in res.stderr and "Traceback" not in res.output


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["item_id", "title", "brand", "categories",
                                       "description", "image", "other"]) | st.text(max_size=5),
                      children, max_size=6),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_item_parser_never_crashes_on_any_json(value) -> None:
    got = parse_item(json.dumps(value), 1, Path("."))
    assert isinstance(got, (Item, ItemError))
    if isinstance(got, Item):
        assert got.item_id and all(isinstance(v, str) and v for v in got.fields.values())


WHITESPACE = [chr(c) for c in range(0x3001) if chr(c).isspace()]  # \t ... \u3000


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.sampled_from(WHITESPACE) | st.characters(exclude_categories=("Cs",)),
                   max_size=40))
def test_text_fields_collapse_whitespace_as_the_regex_did(text: str) -> None:
    """Every run of Unicode whitespace is one space, none at the ends: the regular
    expression the parser used before is the reference."""
    got = parse_item(json.dumps({"item_id": "A", "title": text, "categories": [[text, "x"]]}),
                     1, Path("."))
    want = re.sub(r"\s+", " ", text).strip()
    assert got.fields.get("title") == (want or None)
    assert got.fields["categories"] == ", ".join(n for n in dict.fromkeys([want, "x"]) if n)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400))
def test_item_reader_never_crashes_on_any_bytes(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "items.jsonl"
    path.write_bytes(data)
    records = list(read_items(path, ItemLimits(max_line_bytes=64, max_text_chars=10)))
    assert all(isinstance(r, (Item, ItemError)) for r in records)
    assert len(records) <= data.count(b"\n") + 1
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")]  # each line's byte
    for r in records:
        if isinstance(r, Item):
            assert r.offset == starts[r.line - 1]


def test_huge_lines_are_skipped_without_being_held(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"item_id": "A", "title": "' + b"x" * (5 << 20) + b'"}\n')
        fh.write(b'{"item_id": "B", "title": "ok"}\n')
    records = list(read_items(path, ItemLimits(max_line_bytes=1 << 20)))
    assert isinstance(records[0], ItemError) and "line longer than" in records[0].reason
    assert isinstance(records[1], Item) and records[1].item_id == "B" and records[1].line == 2
    assert records[1].offset == path.read_bytes().index(b"\n") + 1  # counted past the drain


def _embed_cmd(small: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [*TOOL, "embed", str(small["catalog"] / "items.jsonl"), "--clip", str(small["clip"]),
            "--out", str(out), "--quiet", "--batch-size", "4", "--shard-items", "8", *extra]


def test_embed_killed_with_sigkill_resumes_to_identical_outputs(small: dict[str, Path],
                                                               tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    subprocess.run(_embed_cmd(small, clean, "--save-views"), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_embed_cmd(small, out, "--save-views"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    work = out / ".embed-work"
    deadline = time.monotonic() + 120
    while len(list(work.glob("shard-*.npz"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("shard-*.npz")))
    assert 3 <= done < 150 // 8, "the kill should land mid-run"
    finals = ["image_feat.npy", "text_feat.npy", "view_feat.npy", "similarity.npy",
              "item_ids.txt", "errors.jsonl", "embed_summary.json"]
    assert not [f for f in finals if (out / f).exists()]  # nothing under a final name yet
    again = subprocess.run(_embed_cmd(small, out, "--save-views"), capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    other = subprocess.run(_embed_cmd(small, out, "--resume"), capture_output=True, text=True)
    assert other.returncode == 2 and "differs in ['options']" in other.stderr
    resumed = subprocess.run(_embed_cmd(small, out, "--save-views", "--resume"),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in finals:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert not work.exists()


def test_train_resumes_after_an_interruption_with_the_same_result(tmp_path: Path,
                                                                   monkeypatch) -> None:
    write_inter(tmp_path / "d", toy_rows())
    rng = np.random.default_rng(1)
    np.save(tmp_path / "d" / "image_feat.npy", rng.standard_normal((20, 16)).astype(np.float32))
    np.save(tmp_path / "d" / "text_feat.npy", rng.standard_normal((20, 8)).astype(np.float32))
    data = load_dataset(tmp_path / "d")
    config = load_config("freedom", overrides={"train": {"epochs": 6, "batch_size": 64,
                                                         "topk": [5, 10],
                                                         "valid_metric": "recall@10"}})
    whole = training.train_model("freedom", data, config, tmp_path / "whole", progress=False)

    real_save = training.save_torch

    def interrupt_after_epoch_2(path: Path, state: dict) -> None:
        real_save(path, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "save_torch", interrupt_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        training.train_model("freedom", data, config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(training, "save_torch", real_save)
    with pytest.raises(training.ConfigError, match="pass --resume"):
        training.train_model("freedom", data, config, tmp_path / "cut", progress=False)
    resumed = training.train_model("freedom", data, config, tmp_path / "cut", progress=False,
                                   resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in h]
    assert strip(resumed.history) == strip(whole.history)
    assert resumed.test == whole.test
    for name in ("user_embeddings.npy", "item_embeddings.npy"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert not (tmp_path / "cut" / training.STATE_DIR).exists()
