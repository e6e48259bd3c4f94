"""A Parquet catalog embeds exactly as the same catalog in JSON Lines with image files: the same
features byte for byte whether the image is bytes, the Hugging Face {bytes, path} struct or a
path column; each bad input gets its JSONL counterpart's action and reason; resumable across
Parquet shards; on one process and on Ray. The JSONL run is the reference, and the expected
records for bad inputs are written out by hand. Everything runs through the real CLI on real
files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from conftest import interrupt_embed_after
from cliper_prod.commands import cli
from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.pipeline import catalog_texts

FEATURES = ["image_feat.npy", "text_feat.npy", "item_ids.txt"]
KEYS = ("item_id", "title", "brand", "categories", "description")
NOT_AN_IMAGE = b"not an image"


def write_parquet(path: Path, records: list[dict], image: str = "bytes",
                  row_group_size: int = 5) -> Path:
    """``records`` (JSONL records, ``image`` relative to ``path``'s folder) as Parquet, the
    image as the file's bytes, as the Hugging Face struct (bytes in every other row, else the
    path) or as the path."""
    columns = {key: [r.get(key) for r in records] for key in KEYS
               if any(key in r for r in records)}

    def cell(i: int, record: dict) -> object:
        if "image" not in record:
            return None
        data = (path.parent / record["image"]).read_bytes()
        return {"bytes": data, "path": record["image"],
                "struct": {"bytes": data if i % 2 == 0 else None, "path": record["image"]},
                "path": record["image"]}[image]

    columns["image"] = [cell(i, r) for i, r in enumerate(records)]
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_jsonl(path: Path, records: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def same_features(a: Path, b: Path) -> None:
    for name in FEATURES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parquet")
    folder = generate_catalog(root / "catalog", SyntheticSpec(
        n_users=10, n_items=24, min_interactions=3, max_interactions=8, seed=11))
    records = [json.loads(x) for x in (folder / "items.jsonl").read_text().splitlines()]
    return {"folder": folder, "records": records,
            "rows": records + [{**records[2], "title": "again"}],  # 24 items, a repeated id
            "clip": build_tiny_clip(root / "clip", catalog_texts(folder) + ["word"])}


def embed(catalog: dict, items: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["embed", str(items), "--clip", str(catalog["clip"]),
                                    "--out", str(out), "--quiet", "--batch-size", "4",
                                    "--shard-items", "8", *extra])


@pytest.fixture(scope="module")
def reference(catalog: dict, tmp_path_factory) -> Path:
    """The catalog's rows as JSONL with image files, embedded."""
    out = tmp_path_factory.mktemp("reference") / "out"
    res = embed(catalog, write_jsonl(catalog["folder"] / "rows.jsonl", catalog["rows"]), out)
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.parametrize("image", ["bytes", "struct", "path"])
def test_parquet_embeds_as_its_jsonl(catalog: dict, reference: Path, tmp_path: Path,
                                     image: str) -> None:
    """The reference's rows as Parquet (row groups of 5 across batches of 4), with
    --out-format parquet."""
    out = tmp_path / "parquet"
    res = embed(catalog, write_parquet(catalog["folder"] / f"{image}.parquet", catalog["rows"],
                                       image), out, "--out-format", "parquet")
    assert res.exit_code == 0, res.output
    same_features(reference, out)
    assert errors(reference) == [{"line": 25, "item_id": "SYN00002", "action": "skipped",
                                  "reason": "duplicate 'item_id' (first kept)"}]
    assert errors(out) == [{"row": 25, **{k: v for k, v in errors(reference)[0].items()
                                          if k != "line"}}]

    table = pq.read_table(out / "features.parquet")  # the .npy files as one table
    assert table.column("item_id").to_pylist() == (out / "item_ids.txt").read_text().split()
    for column, name in [("image_feat", "image_feat.npy"), ("text_feat", "text_feat.npy")]:
        np.testing.assert_array_equal(np.array(table.column(column).to_pylist(), np.float32),
                                      np.load(out / name))
    meta = json.loads(table.schema.metadata[b"cliper"])
    assert (meta["dim"], meta["clip"], meta["fusion"]) == (32, str(catalog["clip"]), "sa")
    assert not (reference / "features.parquet").exists()


def bad_catalogs(catalog: dict, root: Path) -> tuple[Path, Path]:
    """The same five shards as JSONL (image files) and as Parquet (image bytes): a with an
    undecodable image, a repeated id, an empty id, an item without text and one without image;
    b without item_id; c with an integer title; d corrupt; e good."""
    records = catalog["records"]
    a = [*records[:6],
         {**records[6], "image": "bad.png"},  # row 7
         {**records[0], "title": "again"},  # 8
         {**records[7], "item_id": "  "},  # 9
         {"item_id": "NOTEXT", "image": records[8]["image"]},  # 10
         {k: v for k, v in records[9].items() if k != "image"}]  # 11
    b = [{k: v for k, v in r.items() if k != "item_id"} for r in records[10:12]]
    c = [{**r, "title": i} for i, r in enumerate(records[12:14])]
    e = records[14:20]
    jsonl, parquet = root / "jsonl", root / "parquet"
    for folder in (jsonl, parquet):
        folder.mkdir()
        (folder / "images").symlink_to(catalog["folder"] / "images")
        (folder / "bad.png").write_bytes(NOT_AN_IMAGE)
    for name, rows in [("a", a), ("b", b), ("c", c), ("e", e)]:
        write_jsonl(jsonl / f"{name}.jsonl", rows)
        write_parquet(parquet / f"{name}.parquet", rows)
    write_jsonl(jsonl / "d.jsonl", ["{not json"])
    (parquet / "d.parquet").write_bytes(b"PAR1 this is not Parquet")
    return jsonl, parquet


def test_bad_parquet_inputs_are_answered_as_in_jsonl(catalog: dict, tmp_path: Path) -> None:
    jsonl, parquet = bad_catalogs(catalog, tmp_path)
    res = embed(catalog, jsonl, tmp_path / "jsonl-out")
    assert res.exit_code == 0, res.output
    res = embed(catalog, parquet, tmp_path / "parquet-out")
    assert res.exit_code == 0, res.output
    same_features(tmp_path / "jsonl-out", tmp_path / "parquet-out")
    undecodable = "not a readable image (not a recognised image format): {}; image embedding " \
                  "= mean of its views"
    missing_id = "missing or empty 'item_id' (a non-empty string)"
    expected = [  # (shard, line or row, item id, action, reason)
        ("a", 7, "SYN00006", "kept", undecodable),
        ("a", 8, "SYN00000", "skipped", "duplicate 'item_id' (first kept)"),
        ("a", 9, None, "skipped", missing_id),
        ("a", 10, "NOTEXT", "kept", "no text field; fused text feature = image embedding"),
        ("a", 11, "SYN00009", "kept", "no 'image' field; image embedding = mean of its views"),
        ("b", 1, None, "skipped", missing_id), ("b", 2, None, "skipped", missing_id),
        ("c", 1, "SYN00012", "skipped", "'title' must be a string, got int"),
        ("c", 2, "SYN00013", "skipped", "'title' must be a string, got int")]
    for suffix, key, label, corrupt in [
            ("jsonl", "line", "bad.png", "malformed JSON (Expecting property name enclosed "
                                         "in double quotes at column 2)"),
            ("parquet", "row", "a.parquet row 7", "not readable as Parquet from this row on "
                                                  "(Parquet magic bytes not found in footer. "
                                                  "Either the file is corrupted or this is not "
                                                  "a parquet file.)")]:
        want = [{"file": f"{shard}.{suffix}", key: n, "item_id": item, "action": action,
                 "reason": reason.format(label)} for shard, n, item, action, reason in expected]
        want.append({"file": f"d.{suffix}", key: 1, "item_id": None, "action": "skipped",
                     "reason": corrupt})  # the run went on to shard e
        assert errors(tmp_path / f"{suffix}-out") == want, suffix

    # --strict stops at the first error, naming the shard and the line or row
    answers = {}
    for suffix, items in [("jsonl", jsonl), ("parquet", parquet),
                          ("jsonl-corrupt", jsonl / "d.jsonl"),
                          ("parquet-corrupt", parquet / "d.parquet")]:
        res = embed(catalog, items, tmp_path / f"strict-{suffix}", "--strict")
        assert res.exit_code == 3 and "Traceback" not in res.output, res.output
        assert not (tmp_path / f"strict-{suffix}").exists() or \
            not any((tmp_path / f"strict-{suffix}").iterdir())
        answers[suffix] = res.stderr
    assert answers["jsonl"].startswith(f"error: {jsonl / 'a.jsonl'}:8: item 'SYN00000': "
                                       f"duplicate 'item_id'")
    assert answers["parquet"] == answers["jsonl"].replace(
        f"{jsonl / 'a.jsonl'}:8:", f"{parquet / 'a.parquet'}: row 8:")
    assert answers["jsonl-corrupt"].startswith(f"error: {jsonl / 'd.jsonl'}:1: malformed JSON")
    assert answers["parquet-corrupt"].startswith(
        f"error: {parquet / 'd.parquet'}: row 1: not readable as Parquet from this row on")


def test_resume_across_parquet_shards_and_refuse_a_changed_shard(
        catalog: dict, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "images").symlink_to(catalog["folder"] / "images")
    records = catalog["records"]
    for name, rows in [("a", records[:10]), ("b", records[10:19] + [records[4]]),
                       ("c", records[19:])]:
        write_parquet(folder / f"{name}.parquet", rows, "struct")
    assert embed(catalog, folder, tmp_path / "whole").exit_code == 0
    resume = interrupt_embed_after(monkeypatch, 2)  # 16 items: shard a's 10 and 6 of b
    out = tmp_path / "cut"
    assert embed(catalog, folder, out).exit_code == 130
    resume()
    progress = json.loads((out / ".embed-work" / "progress.json").read_text())
    assert progress["last_position"] == 10 + 6  # row 6 of shard b

    shard_c = folder / "c.parquet"
    before, stat = shard_c.read_bytes(), shard_c.stat()
    write_parquet(shard_c, records[19:], "struct", row_group_size=3)
    res = embed(catalog, folder, out, "--resume")
    assert res.exit_code == 2 and "differs in ['files']" in res.stderr
    shard_c.write_bytes(before)
    os.utime(shard_c, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    res = embed(catalog, folder, out, "--resume")
    assert res.exit_code == 0, res.output
    for name in [*FEATURES, "errors.jsonl"]:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert errors(out) == [{"file": "b.parquet", "row": 10, "item_id": "SYN00004",
                            "action": "skipped", "reason": "duplicate 'item_id' (first kept)"}]


def test_a_folder_of_both_formats_is_refused(catalog: dict, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", catalog["records"][:2])
    (folder / "b.parquet").write_bytes(b"")
    res = embed(catalog, folder, tmp_path / "out")
    assert res.exit_code == 2 and "holds both *.jsonl (1) and *.parquet (1) files" in res.stderr


def test_without_pyarrow_parquet_is_an_option_error(catalog: dict, tmp_path: Path) -> None:
    """In interpreters where pyarrow cannot be imported, the runtime modules import and a JSONL
    catalog reads; Parquet input and output are refused before any model loads, naming the
    extra to install."""
    block = "import sys; sys.modules['pyarrow'] = None; "
    items = write_jsonl(catalog["folder"] / "few.jsonl", catalog["records"][:3])
    res = subprocess.run([sys.executable, "-c", block + (
        "import cliper_prod.runtime.embed_ray, cliper_prod.runtime.recommender; "
        "from cliper_prod.features.catalog import Catalog, read_catalog; "
        f"print(len(list(read_catalog(Catalog.at(sys.modules['pathlib'].Path({str(items)!r}))))))"
    )], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "3\n", res.stderr
    parquet = write_parquet(catalog["folder"] / "few.parquet", catalog["records"][:3])
    for args in ([str(parquet)], [str(items), "--out-format", "parquet"]):
        res = subprocess.run([sys.executable, "-c", block + "from cliper_prod.commands import "
                              "main; main()", "embed", *args, "--clip", str(catalog["clip"]),
                              "--out", str(tmp_path / "out")], capture_output=True, text=True)
        assert res.returncode == 2, res.stderr
        assert "need pyarrow: pip install 'cliper-prod[parquet]'" in res.stderr
        assert not (tmp_path / "out").exists()


def test_parquet_on_ray_is_byte_identical(local_ray, exported, tmp_path: Path) -> None:
    """Shards with the image as the struct and as bytes, a batch spanning them, a repeated id,
    an undecodable image and a corrupt shard: --ray writes the single-process bytes, whose
    features are those of the JSONL catalog with image files."""
    source = exported["catalog"]
    records = [json.loads(x) for x in (source / "items.jsonl").read_text().splitlines()][:12]
    shards = {"p1": records[:5], "p2": records[5:11] + [{**records[1], "title": "again"}],
              "p3": [{**records[11], "image": "bad.png"}]}
    runs = {}
    for suffix in ("jsonl", "parquet"):
        folder = tmp_path / suffix
        folder.mkdir()
        (folder / "images").symlink_to(source / "images")
        (folder / "bad.png").write_bytes(NOT_AN_IMAGE)
        for name, rows in shards.items():
            if suffix == "jsonl":
                write_jsonl(folder / f"{name}.jsonl", rows)
            else:
                write_parquet(folder / f"{name}.parquet", rows, "struct" if name == "p1"
                              else "bytes", row_group_size=3)
        (folder / f"p4.{suffix}").write_bytes(b"\x00 corrupt")
        for mode in ("one", "ray")[:2 if suffix == "parquet" else 1]:
            res = CliRunner().invoke(cli, ["embed", str(folder), "--bundle",
                                           str(exported["bundle"]), "--out",
                                           str(tmp_path / f"{suffix}-{mode}"), "--quiet",
                                           "--batch-size", "2", "--shard-items", "4",
                                           *(["--ray"] if mode == "ray" else [])])
            assert res.exit_code == 0, res.output
            runs[f"{suffix}-{mode}"] = tmp_path / f"{suffix}-{mode}"
    names = sorted(p.name for p in runs["parquet-one"].iterdir())
    assert names == sorted(p.name for p in runs["parquet-ray"].iterdir())
    for name in names:
        assert (runs["parquet-one"] / name).read_bytes() == \
            (runs["parquet-ray"] / name).read_bytes(), name
    same_features(runs["jsonl-one"], runs["parquet-one"])
    got = [(e["file"], e["row"], e["item_id"], e["action"]) for e in errors(runs["parquet-ray"])]
    assert got == [("p2.parquet", 7, records[1]["item_id"], "skipped"),
                   ("p3.parquet", 1, records[11]["item_id"], "kept"),
                   ("p4.parquet", 1, None, "skipped")]
    assert len((runs["parquet-ray"] / "item_ids.txt").read_text().split()) == 12


def test_damaged_image_data_is_listed_by_one_process_and_stops_ray(local_ray, exported,
                                                                   tmp_path: Path) -> None:
    """A file whose image column is damaged from its second row group on: the single-process
    run reads rows 1-3 and lists the rest as one record; --ray, whose planning pass reads no
    image bytes, stops with exit 3 naming the file and row (documented)."""
    source = exported["catalog"]
    records = [json.loads(x) for x in (source / "items.jsonl").read_text().splitlines()][:9]
    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "images").symlink_to(source / "images")
    path = write_parquet(folder / "a.parquet", records, row_group_size=3)
    group = pq.ParquetFile(path).metadata.row_group(1)
    image = next(group.column(i) for i in range(group.num_columns)
                 if group.column(i).path_in_schema == "image")
    data = bytearray(path.read_bytes())
    for at in range(image.data_page_offset, image.data_page_offset + 12):
        data[at] ^= 0xFF  # the first page header of the image column in rows 4-6
    path.write_bytes(bytes(data))
    runs = {}
    for mode in ("one", "ray"):
        runs[mode] = CliRunner().invoke(cli, [
            "embed", str(folder), "--bundle", str(exported["bundle"]), "--out",
            str(tmp_path / mode), "--quiet", "--batch-size", "2", "--shard-items", "4",
            *(["--ray"] if mode == "ray" else [])])
    assert runs["one"].exit_code == 0, runs["one"].output
    assert (tmp_path / "one" / "item_ids.txt").read_text().split() == \
        [r["item_id"] for r in records[:3]]
    [record] = errors(tmp_path / "one")
    assert (record["file"], record["row"], record["action"]) == ("a.parquet", 4, "skipped")
    assert record["reason"].startswith("not readable as Parquet from this row on (")
    assert runs["ray"].exit_code == 3, runs["ray"].output
    assert runs["ray"].stderr.startswith(f"error: {path}: row 4: could not be re-read (")
    assert "Traceback" not in runs["ray"].output
