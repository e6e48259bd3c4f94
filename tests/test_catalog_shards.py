"""A catalog split into JSONL shards embeds exactly as the same lines in one file: the rows, the
ids and the errors (which name their shard and the line there), resumable across a shard
boundary. The single file is the reference; the expected errors are written out by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import interrupt_embed_after
from cliper_prod.commands import cli
from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.pipeline import catalog_texts

OUTPUTS = ["image_feat.npy", "text_feat.npy", "item_ids.txt"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, Path]:
    """60 items as three shards (one in a subfolder, with relative image paths resolved there)
    and as one file in the catalog folder holding the same lines in the same order."""
    root = tmp_path_factory.mktemp("shards")
    catalog = root / "catalog"
    generate_catalog(catalog, SyntheticSpec(n_users=30, n_items=60, seed=7))
    clip = build_tiny_clip(root / "clip", catalog_texts(catalog) + ["word"])
    records = [json.loads(line) for line in (catalog / "items.jsonl").read_text().splitlines()]
    absolute = [json.dumps({**r, "image": str(catalog / r["image"])}) for r in records]
    relative = [json.dumps(r) for r in records]
    shard_a = "\n".join(absolute[:20]) + "\n\n"  # 20 items, then a blank line 21
    shard_b = "\n".join(relative[20:25] + ["{not json"] + relative[25:40]  # bad line 6
                        + [json.dumps({**records[3], "title": "again"})]) + "\n"  # dup, line 22
    missing = json.dumps({**records[45], "image": "nope.png"})  # c line 6: no such image
    shard_c = "\n".join(absolute[40:45] + [missing] + absolute[46:])  # no final newline
    folder = root / "items"
    (folder / "b").mkdir(parents=True)
    (folder / "a.jsonl").write_text(shard_a)
    (folder / "b" / "part.jsonl").write_text(shard_b)
    (folder / "b" / "images").symlink_to(catalog / "images")
    (folder / "c.jsonl").write_text(shard_c)
    (folder / "notes.txt").write_text("not a shard")
    (catalog / "one.jsonl").write_text(shard_a + shard_b + shard_c)
    return {"clip": clip, "folder": folder, "one": catalog / "one.jsonl"}


def _embed(sharded: dict[str, Path], items: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["embed", str(items), "--clip", str(sharded["clip"]),
                                    "--out", str(out), "--quiet", "--batch-size", "4",
                                    "--shard-items", "8", *extra])


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_sharded_catalog_embeds_as_one_file(sharded: dict[str, Path], tmp_path: Path) -> None:
    assert _embed(sharded, sharded["one"], tmp_path / "one").exit_code == 0
    res = _embed(sharded, sharded["folder"], tmp_path / "shards")
    assert res.exit_code == 0, res.output
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == \
            (tmp_path / "shards" / name).read_bytes(), name
    assert len((tmp_path / "one" / "item_ids.txt").read_text().split()) == 60  # SYN00045 kept
    # shard a has 21 lines, shard b 22: b's line 6 is line 27 of the one file, and so on
    expected = [("b/part.jsonl", 6, 27, None, "skipped", "malformed JSON"),
                ("b/part.jsonl", 22, 43, "SYN00003", "skipped", "duplicate 'item_id'"),
                ("c.jsonl", 6, 49, "SYN00045", "kept", "image not found")]
    got, reference = _errors(tmp_path / "shards"), _errors(tmp_path / "one")
    assert [(e["file"], e["line"], e["item_id"], e["action"]) for e in got] == \
        [x[:2] + x[3:5] for x in expected]
    assert [(e["line"], e["item_id"], e["action"]) for e in reference] == \
        [x[2:5] for x in expected]
    assert all("file" not in e for e in reference)
    assert all(x[5] in e["reason"] for x, e in zip(expected, got))
    assert json.loads((tmp_path / "shards" / "embed_summary.json").read_text())[
        "input_files"] == 3


def test_strict_names_the_shard_and_its_line(sharded: dict[str, Path], tmp_path: Path) -> None:
    res = _embed(sharded, sharded["folder"], tmp_path / "out", "--strict")
    assert res.exit_code == 3
    assert res.stderr.startswith(f"error: {sharded['folder'] / 'b' / 'part.jsonl'}:6: "
                                 f"malformed JSON")


def test_empty_missing_or_self_overwriting_catalog_is_refused(sharded: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "items.json").write_text("{}")
    res = _embed(sharded, tmp_path / "empty", tmp_path / "out")
    assert res.exit_code == 2 and "holds no *.jsonl files" in res.stderr
    res = _embed(sharded, tmp_path / "absent", tmp_path / "out")
    assert res.exit_code == 2 and "no such items file or folder" in res.stderr
    assert not (tmp_path / "out").exists()
    res = _embed(sharded, sharded["folder"], sharded["folder"] / "features")
    assert res.exit_code == 2 and "inside the catalog folder" in res.stderr
    assert not (sharded["folder"] / "features").exists()


def test_resume_across_a_shard_boundary_and_refuse_a_changed_shard(
        sharded: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    assert _embed(sharded, sharded["folder"], tmp_path / "whole").exit_code == 0
    resume = interrupt_embed_after(monkeypatch, 3)  # 24 items: shard a's 20 and 4 of b
    out = tmp_path / "cut"
    assert _embed(sharded, sharded["folder"], out).exit_code == 130
    resume()
    progress = json.loads((out / ".embed-work" / "progress.json").read_text())
    assert progress["last_position"] == 21 + 4  # line 4 of shard b

    shard_c = sharded["folder"] / "c.jsonl"
    before, stat = shard_c.read_bytes(), shard_c.stat()
    shard_c.write_bytes(before + b"\n")
    try:
        res = _embed(sharded, sharded["folder"], out, "--resume")
        assert res.exit_code == 2 and "differs in ['files']" in res.stderr
    finally:
        shard_c.write_bytes(before)
        os.utime(shard_c, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    res = _embed(sharded, sharded["folder"], out, "--resume")
    assert res.exit_code == 0, res.output
    for name in [*OUTPUTS, "errors.jsonl"]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
