"""Hostile files and paths (issue 32), through the real CLI and, for HTTP, both engines: ids
that a line reader splits, files of ids that do not pair with their tables, malformed
`--features` files, output paths that are links or lie under files, signals mid-run, manifests
edited after export, server paths in /metadata, loosely typed request fields. Every case is
built here; expectations come from Python and numpy themselves (``str.splitlines``,
``hashlib``, ``np.linalg.norm``), never from the package's own output."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.commands import cli
from conftest import call, rewrite_manifest

#: every character ``str.splitlines`` breaks a line at, found by asking it (not a copied list)
BREAKS = [c for c in map(chr, range(0x110000)) if len(f"a{c}b".splitlines()) == 2]
CLI = str(Path(sys.executable).parent / "cliper-prod")


def test_the_line_breaks_are_the_ten_the_issue_names() -> None:
    assert set(BREAKS) == set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def run(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(res, code: int, *words: str) -> None:
    """``res`` failed with ``code`` in one line on stderr holding ``words``, no traceback."""
    assert res.exit_code == code, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    for word in words:
        assert word in lines[0], (word, lines[0])


def bad_id(c: str) -> str:
    return f"bad{c}id{ord(c):x}"


def catalog_lines() -> list[dict]:
    """A good item, one item per line-breaking character, another good item."""
    return ([{"item_id": "good0", "title": "a red stroller"}]
            + [{"item_id": bad_id(c), "title": "a blue car seat"} for c in BREAKS]
            + [{"item_id": "good1", "title": "a green carrier"}])


def write_catalog(folder: Path, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    records = catalog_lines()
    if fmt == "jsonl":
        path = folder / "items.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))  # escapes every break
        assert len(path.read_text().split("\n")) == len(records) + 1
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "items.parquet"
    pq.write_table(pa.table({"item_id": [r["item_id"] for r in records],
                             "title": [r["title"] for r in records]}), path)
    return path


def ids_of(path: Path) -> list[bytes]:
    """A file of ids split at b"\\n" only, as bytes: the rows it names whatever the reader."""
    return path.read_bytes().split(b"\n")[:-1]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


# -- 1. ids that break lines -------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_embed_makes_each_line_breaking_id_its_items_error(exported, tmp_path, fmt) -> None:
    catalog = write_catalog(tmp_path / "cat", fmt)
    out = tmp_path / "out"
    res = run("embed", catalog, "--bundle", exported["bundle"], "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert ids_of(out / "item_ids.txt") == [b"good0", b"good1"]
    assert np.load(out / "image_feat.npy").shape[0] == 2
    assert np.load(out / "text_feat.npy").shape[0] == 2
    errors = [e for e in records(out / "errors.jsonl") if e["action"] == "skipped"]
    unit = "line" if fmt == "jsonl" else "row"  # (the good ones are kept: they have no image)
    assert [(e[unit], e["item_id"], e["action"]) for e in errors] == \
        [(n, bad_id(c), "skipped") for n, c in enumerate(BREAKS, start=2)]
    assert all("line-breaking" in e["reason"] for e in errors)


def test_add_items_from_a_catalog_skips_each_line_breaking_id_naming_its_line(
        exported, tmp_path) -> None:
    catalog = write_catalog(tmp_path / "cat", "jsonl")
    out = tmp_path / "b2"
    res = run("add-items", "--bundle", exported["bundle"], "--items", catalog, "--out", out,
              "--quiet")
    assert res.exit_code == 0, res.output
    before = ids_of(exported["bundle"] / "item_ids.txt")
    assert ids_of(out / "item_ids.txt") == before + [b"good0", b"good1"]
    assert np.load(out / "item_embeddings.npy").shape[0] == len(before) + 2
    errors = [e for e in records(tmp_path / "b2.errors.jsonl") if e["action"] == "skipped"]
    assert [(e["file"], e["line"], e["item_id"]) for e in errors] == \
        [(str(catalog), n, bad_id(c)) for n, c in enumerate(BREAKS, start=2)]
    for n in range(2, 2 + len(BREAKS)):
        assert f"{catalog}:{n}: skipped: " in res.stderr
    assert "/tmp/cliper-add-items" not in res.output and ".tmp" not in res.output
    users = tmp_path / "h.jsonl"  # the bundle works: a history of an added item ranks
    users.write_text(json.dumps({"user": "h", "history": [before[3].decode(), "good1"]}) + "\n")
    res = run("topk", "--bundle", out, "--histories", users, "-k", "5")
    assert res.exit_code == 0 and len(json.loads(res.stdout)["items"]) == 5, res.output


def feature_folder(folder: Path, exported, ids: list[str], seed: int = 5) -> Path:
    """An `embed`-like folder of ``ids``, their rows near existing items' features."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for m in ("image", "text"):
        base = np.load(exported["catalog"] / "cliper" / f"{m}_feat.npy")
        rows = base[rng.integers(0, len(base), len(ids))]
        np.save(folder / f"{m}_feat.npy",
                (rows + 0.05 * rng.standard_normal(rows.shape)).astype(np.float32))
    (folder / "item_ids.txt").write_bytes("".join(f"{i}\n" for i in ids).encode())
    shutil.copy(exported["catalog"] / "cliper" / "embed_summary.json", folder)
    return folder


def test_add_items_from_features_skips_each_line_breaking_id_naming_its_line(
        exported, tmp_path) -> None:
    inside = [c for c in BREAKS if c != "\n"]  # "\n" ends a line in any reader: see below
    ids = ["N0"] + [bad_id(c) for c in inside] + ["N1"]
    feats = feature_folder(tmp_path / "feats", exported, ids)
    res = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out",
              tmp_path / "b2", "--quiet")
    assert res.exit_code == 0, res.output
    assert ids_of(tmp_path / "b2" / "item_ids.txt")[-2:] == [b"N0", b"N1"]
    errors = records(tmp_path / "b2.errors.jsonl")
    assert [(e["file"], e["line"], e["item_id"]) for e in errors] == \
        [(str(feats / "item_ids.txt"), n, bad_id(c)) for n, c in enumerate(inside, start=2)]
    # an id holding "\n" is two lines for one row: the file pairs no longer, refused whole
    with (feats / "item_ids.txt").open("a") as fh:
        fh.write("split\nid\n")
    res = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out",
              tmp_path / "b3")
    one_line_error(res, 3, "image_feat.npy", "item_ids.txt has")
    assert not (tmp_path / "b3").exists()


def mmrec_copy(exported, folder: Path) -> Path:
    folder.mkdir()
    for name in ("i_id_mapping.csv", "u_id_mapping.csv"):
        shutil.copy(exported["catalog"] / name, folder)
    for inter in exported["catalog"].glob("*.inter"):
        shutil.copy(inter, folder)
    return folder


def set_external_id(path: Path, row: int, value: str) -> None:
    """Give mapping line ``row`` + 2 the external id ``value``, written by csv (which quotes
    a field holding \\n or \\r, so the file stays one record per id)."""
    with path.open(newline="", encoding="utf-8") as fh:
        table = list(csv.reader(fh, delimiter="\t"))
    table[row + 1][0] = value
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, delimiter="\t").writerows(table)


@pytest.mark.parametrize("c", BREAKS, ids=[f"U+{ord(c):04X}" for c in BREAKS])
def test_export_refuses_a_line_breaking_id_in_the_mmrec_mapping(exported, tmp_path, c) -> None:
    data = mmrec_copy(exported, tmp_path / "data")
    set_external_id(data / "i_id_mapping.csv", 3, bad_id(c))
    res = run("export", "--checkpoint", exported["ckpt"], "--data", data, "--out",
              tmp_path / "b")
    one_line_error(res, 3, "i_id_mapping.csv", "line-breaking")
    assert not (tmp_path / "b").exists()


def test_export_refuses_a_mapping_that_is_not_utf8(exported, tmp_path) -> None:
    data = mmrec_copy(exported, tmp_path / "data")
    with (data / "i_id_mapping.csv").open("ab") as fh:
        fh.write(b"\xff\xfe\t0\n")
    res = run("export", "--checkpoint", exported["ckpt"], "--data", data, "--out",
              tmp_path / "b")
    one_line_error(res, 3, str(data / "i_id_mapping.csv"), "not UTF-8")


def test_train_refuses_a_line_breaking_user_id(exported, tmp_path) -> None:
    data = mmrec_copy(exported, tmp_path / "data")
    set_external_id(data / "u_id_mapping.csv", 0, "U\u2028x")
    res = run("train", "--data", data, "--out", tmp_path / "ckpt", "--quiet")
    one_line_error(res, 3, "u_id_mapping.csv", "U+2028")


def rehash(folder: Path, *names: str) -> None:
    """The manifest's hashes of ``names`` recomputed (hashlib), then its own."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    rewrite_manifest(folder, manifest)


@pytest.mark.parametrize("name,change", [("item_ids.txt", 1), ("item_ids.txt", -1),
                                         ("user_ids.txt", 1), ("user_ids.txt", -1)])
def test_a_bundle_whose_ids_and_rows_disagree_is_refused(exported, tmp_path, name,
                                                         change) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], bundle)
    lines = ids_of(bundle / name)
    lines = lines + [b"extra"] if change > 0 else lines[:-1]
    (bundle / name).write_bytes(b"".join(line + b"\n" for line in lines))
    rehash(bundle, name)  # every hash matches
    users = tmp_path / "u.txt"
    users.write_bytes(ids_of(exported["bundle"] / "user_ids.txt")[0] + b"\n")
    one_line_error(run("topk", "--bundle", bundle, "--users", users), 7, name, "rows")
    feats = feature_folder(tmp_path / "feats", exported, ["N0"])
    one_line_error(run("add-items", "--bundle", bundle, "--features", feats, "--out",
                       tmp_path / "b2"), 7, name, "rows")
    for engine in ("local", "ray"):  # refused before either engine starts
        one_line_error(run("serve", "--engine", engine, "--bundle", bundle, "--port", "1"), 7,
                       name, "rows")


# -- 3. malformed --features files: exit 3 naming the file ---------------------------------------

def _pickled(folder: Path) -> None:
    np.save(folder / "image_feat.npy", np.array([{"a": 1}] * 4, dtype=object),
            allow_pickle=True)


def _truncated(folder: Path) -> None:
    data = (folder / "image_feat.npy").read_bytes()
    (folder / "image_feat.npy").write_bytes(data[:len(data) // 2])


MALFORMED = {
    "pickled object array": (_pickled, "image_feat.npy"),
    "truncated npy": (_truncated, "image_feat.npy"),
    "not npy": (lambda f: (f / "text_feat.npy").write_text("id,x\n1,2\n"), "text_feat.npy"),
    "integer dtype": (lambda f: np.save(f / "image_feat.npy", np.ones((4, 32), np.int64)),
                      "image_feat.npy"),
    "1-d": (lambda f: np.save(f / "image_feat.npy", np.ones(4, np.float32)), "image_feat.npy"),
    "3-d": (lambda f: np.save(f / "text_feat.npy", np.ones((4, 2, 2), np.float32)),
            "text_feat.npy"),
    "a row missing": (lambda f: np.save(f / "image_feat.npy",
                                        np.load(f / "image_feat.npy")[:3]), "image_feat.npy"),
    "item_ids.txt not UTF-8": (lambda f: (f / "item_ids.txt").write_bytes(
        b"N0\nN\xff\xfe1\nN2\nN3\n"), "item_ids.txt"),
    "summary not JSON": (lambda f: (f / "embed_summary.json").write_text("{not json"),
                         "embed_summary.json"),
    "summary a list": (lambda f: (f / "embed_summary.json").write_text("[1, 2]"),
                       "embed_summary.json"),
    "summary without its keys": (lambda f: (f / "embed_summary.json").write_text(
        '{"dim": 32}'), "embed_summary.json"),
    "features missing": (lambda f: (f / "text_feat.npy").unlink(), "text_feat.npy"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_features_file_is_exit_3_naming_it(exported, tmp_path, case) -> None:
    feats = feature_folder(tmp_path / "feats", exported, ["N0", "N1", "N2", "N3"])
    edit, file = MALFORMED[case]
    edit(feats)
    res = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out",
              tmp_path / "b2")
    one_line_error(res, 3, str(feats / file))
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b2.errors.jsonl").exists()


def test_rows_and_ids_that_cannot_be_added_are_each_items_error(exported, tmp_path) -> None:
    known = ids_of(exported["bundle"] / "item_ids.txt")[1].decode()
    ids = ["N0", "BIG", "NAN", "ZERO", "N1", known, "N0", " pad"]
    feats = feature_folder(tmp_path / "feats", exported, ids)
    image = np.load(feats / "image_feat.npy")
    image[1] = 1e38  # finite, but its float32 length is not
    assert np.isfinite(image[1]).all() and not np.isfinite(np.linalg.norm(image[1]))
    image[2, 0], image[3] = np.nan, 0.0
    np.save(feats / "image_feat.npy", image)
    strict = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out",
                 tmp_path / "s", "--strict")
    one_line_error(strict, 3, f"{feats / 'image_feat.npy'}: row 2", "'BIG'", "--strict")
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.errors.jsonl").exists()
    errors_file = tmp_path / "report" / "errors.jsonl"
    res = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out",
              tmp_path / "b2", "--errors", errors_file, "--quiet")
    assert res.exit_code == 0, res.output
    assert ids_of(tmp_path / "b2" / "item_ids.txt")[-2:] == [b"N0", b"N1"]
    got = {(e["item_id"], e.get("line"), e.get("row"), Path(e["file"]).name)
           for e in records(errors_file)}
    assert got == {("BIG", None, 2, "image_feat.npy"), ("NAN", None, 3, "image_feat.npy"),
                   ("ZERO", None, 4, "image_feat.npy"), (known, 6, None, "item_ids.txt"),
                   ("N0", 7, None, "item_ids.txt"), (" pad", 8, None, "item_ids.txt")}
    assert "2 item(s)" in res.stderr and str(errors_file) in res.stderr
    only_known = feature_folder(tmp_path / "known", exported, [known])
    res = run("add-items", "--bundle", exported["bundle"], "--features", only_known, "--out",
              tmp_path / "b3")
    assert res.exit_code == 3 and "no item to add" in res.stderr, res.output
    assert not (tmp_path / "b3").exists()
    assert [e["item_id"] for e in records(tmp_path / "b3.errors.jsonl")] == [known]


# -- 4. output paths: one policy for every writing command ---------------------------------------

@pytest.fixture
def inputs(exported, tmp_path) -> dict[str, Path]:
    users = tmp_path / "in" / "users.txt"
    users.parent.mkdir()
    users.write_bytes(ids_of(exported["bundle"] / "user_ids.txt")[0] + b"\n")
    histories = tmp_path / "in" / "h.jsonl"
    item = ids_of(exported["bundle"] / "item_ids.txt")[0].decode()
    histories.write_text(json.dumps({"user": "h", "history": [item]}) + "\n")
    return {"users": users, "histories": histories, "fresh": tmp_path / "fresh-bundle",
            "features": feature_folder(tmp_path / "in" / "feats", exported, ["N0"])}


def command(name: str, exported, inputs, out: Path) -> list[object]:
    bundle = exported["bundle"]
    return {"embed": ["embed", exported["policy_items"], "--bundle", bundle, "--out", out],
            "export": ["export", "--checkpoint", exported["ckpt"], "--out", out],
            "add-items": ["add-items", "--bundle", bundle, "--features", inputs["features"],
                          "--out", out],
            "add-items --errors": ["add-items", "--bundle", bundle, "--features",
                                   inputs["features"], "--out", inputs["fresh"],
                                   "--errors", out],
            "topk --users": ["topk", "--bundle", bundle, "--users", inputs["users"], "--out",
                             out],
            "topk --histories": ["topk", "--bundle", bundle, "--histories",
                                 inputs["histories"], "--out", out],
            "train": ["train", "--data", exported["catalog"], "--out", out, "--quiet"],
            "compare": ["compare", "--data", exported["catalog"], "--out", out, "--quiet"],
            "synthetic": ["synthetic", out],
            "random-features": ["random-features", "--data", exported["catalog"], "--out", out],
            "convert-clip": ["convert-clip", inputs["users"], "--tokenizer", exported["clip"],
                             "--out", out]}[name]


FILE_OUTPUTS = ("topk --users", "topk --histories", "add-items --errors")
FOLDER_OUTPUTS = ("embed", "export", "add-items", "train", "compare", "synthetic",
                  "random-features", "convert-clip")


def _under_a_file(place: Path) -> Path:
    (place / "a-file").write_text("keep me\n")
    return place / "a-file" / "out"


def _link(place: Path) -> Path:
    target = place / "other-bundle"  # looks like a bundle: only a link stops the write
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    (place / "link").symlink_to(target)
    return place / "link"


def _folder(place: Path) -> Path:
    (place / "a-folder").mkdir()
    (place / "a-folder" / "x.txt").write_text("keep me\n")
    return place / "a-folder"


def _empty_folder(place: Path) -> Path:
    (place / "empty").mkdir()
    return place / "empty"


def _file(place: Path) -> Path:
    (place / "a-file").write_text("keep me\n")
    return place / "a-file"


OUT_CASES = ([(cmd, case) for cmd in FILE_OUTPUTS + FOLDER_OUTPUTS
              for case in ("under a file", "symbolic link")]
             + [(cmd, case) for cmd in FILE_OUTPUTS for case in ("a folder", "an empty folder")]
             + [(cmd, "a file") for cmd in FOLDER_OUTPUTS]
             + [(cmd, "a folder") for cmd in ("export", "add-items")])
MAKE_OUT = {"under a file": _under_a_file, "symbolic link": _link, "a folder": _folder,
            "an empty folder": _empty_folder, "a file": _file}


def snapshot(place: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(place)): (os.readlink(p) if p.is_symlink() else
                                        p.read_bytes() if p.is_file() else "dir")
            for p in sorted(place.rglob("*"))}


@pytest.mark.parametrize("name,case", OUT_CASES, ids=[f"{a}-{b}" for a, b in OUT_CASES])
def test_each_refused_output_path_is_exit_2_in_one_line_before_any_work(
        exported, inputs, tmp_path, name, case) -> None:
    place = tmp_path / "place"
    place.mkdir()
    out = MAKE_OUT[case](place)
    before = snapshot(place)
    res = run(*command(name, exported, inputs, out))
    one_line_error(res, 2, str(out))
    assert snapshot(place) == before  # nothing written, nothing replaced, no temporaries


# -- 4b. signals: nothing left behind after the next run ------------------------------------------

def big_catalog(folder: Path, n: int = 4000) -> Path:
    folder.mkdir()
    path = folder / "items.jsonl"
    words = ["red", "blue", "stroller", "car seat", "carrier", "soft", "light", "travel"]
    path.write_text("".join(json.dumps({"item_id": f"B{i}", "title": " ".join(
        words[(i * k) % len(words)] for k in range(1, 12))}) + "\n" for i in range(n)))
    return path


def start(*args: object, cwd: Path) -> subprocess.Popen:
    """The command in a process of its own, SIGINT at its default whatever the test runner's
    (a shell's background job ignores it, and Python then never raises KeyboardInterrupt)."""
    return subprocess.Popen([CLI, *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=cwd, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(pattern: str, place: Path, proc: subprocess.Popen, timeout_s: float = 120
              ) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(place.glob(pattern))
        if found:
            return found
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise AssertionError(f"{pattern} never appeared")


def leftovers(place: Path, out: Path) -> list[str]:
    return sorted(p.name for p in place.iterdir() if p.name.startswith(f".{out.name}."))


def add_items_at_work(exported, tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`add-items` of a large catalog started into ``place/b2``, once it is embedding (its work
    folder exists): the process, ``place`` and the output path."""
    catalog = big_catalog(tmp_path / "cat")
    place = tmp_path / "place"
    place.mkdir()
    out = place / "b2"
    proc = start("add-items", "--bundle", exported["bundle"], "--items", catalog, "--out", out,
                 "--quiet", cwd=tmp_path)
    wait_for(".b2.*.work.*.tmp/.embed-work", place, proc)
    return proc, place, out


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_add_items_leaves_nothing_behind(exported, tmp_path, sig,
                                                         code) -> None:
    proc, place, out = add_items_at_work(exported, tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert list(place.iterdir()) == []


def test_a_sigkilled_add_items_is_cleaned_up_by_the_next_run(exported, inputs,
                                                             tmp_path) -> None:
    proc, place, out = add_items_at_work(exported, tmp_path)
    proc.kill()
    proc.wait()
    left = leftovers(place, out)
    assert left and all(str(proc.pid) in name for name in left)
    res = run("add-items", "--bundle", exported["bundle"], "--features", inputs["features"],
              "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert leftovers(place, out) == []
    for name in left:
        assert f"{place / name}: removed, left by an interrupted run" in res.stderr


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                      (signal.SIGKILL, -9)])
def test_a_signal_during_export_leaves_nothing_after_the_next_run(exported, tmp_path, sig,
                                                                  code) -> None:
    place = tmp_path / "place"
    place.mkdir()
    out = place / "bundle"
    proc = start("export", "--checkpoint", exported["ckpt"], "--out", out, cwd=tmp_path)
    wait_for(".bundle.*.tmp/*", place, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    if sig != signal.SIGKILL:
        assert list(place.iterdir()) == []
        return
    assert leftovers(place, out)
    # the next run writing there removes them, even one that then fails (another backbone)
    res = run("export", "--backbone", "lightgcn", "--checkpoint", exported["ckpt"], "--out",
              out)
    assert res.exit_code == 4 and leftovers(place, out) == [] and "removed" in res.stderr


# -- 5. a manifest that cannot lie ----------------------------------------------------------------

def _set(path: list[str], value):
    def edit(manifest: dict) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return edit


def _topk_outputs(k: int):
    def edit(manifest: dict) -> None:
        record = manifest["graphs"]["topk"]
        record["k"] = k
        for output in record["outputs"]:
            output["shape"][1] = k
    return edit


EDITS = {
    "knn_k +1": (_set(["fold_in", "params", "knn_k"], lambda k: k + 1), False, "edited"),
    "top-K k 50 -> 900": (_set(["graphs", "topk", "k"], 900), False, "edited"),
    "dataset renamed": (_set(["dataset"], "other"), False, "edited"),
    "rehashed: top-K k 50 -> 900": (_set(["graphs", "topk", "k"], 900), True, "k 900"),
    "rehashed: k and output shapes 50 -> 40": (_topk_outputs(40), True, "output items"),
    "rehashed: n_items +1": (_set(["graphs", "topk", "n_items"], lambda n: n + 1), True,
                             "item_embeddings.npy has shape"),
    "rehashed: dim +1": (_set(["graphs", "topk", "dim"], lambda n: n + 1), True, "shape"),
    "rehashed: knn_k beyond the catalog": (_set(["fold_in", "params", "knn_k"], 10_000), True,
                                           "knn_k 10000"),
    "rehashed: a variant not in the bundle": (
        _set(["graphs", "image_encoder", "fused", "preferred", "CPUExecutionProvider",
              "fp32"], "turbo"), True, "'turbo'"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_manifest_is_refused_by_topk_and_add_items(exported, inputs, tmp_path,
                                                            case) -> None:
    edit, rehashed, words = EDITS[case]
    bundle = tmp_path / "bundle"
    shutil.copytree(exported["bundle"], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    if rehashed:  # an editor who knows the format: only the artifacts can tell
        rewrite_manifest(bundle, manifest)
    else:
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    one_line_error(run("topk", "--bundle", bundle, "--users", inputs["users"], "-k", "30"), 7,
                   words)
    one_line_error(run("add-items", "--bundle", bundle, "--features", inputs["features"],
                       "--out", tmp_path / "b2"), 7, words)
    if words != "output items":  # (that one shows when a session opens: in each worker)
        for engine in ("local", "ray"):
            one_line_error(run("serve", "--engine", engine, "--bundle", bundle, "--port", "1"),
                           7, words)


# -- 6, 7. the HTTP surface of both engines -------------------------------------------------------

@pytest.fixture(params=["local", "ray"])
def server(request) -> str:
    return request.getfixturevalue({"local": "local_service", "ray": "service"}[request.param])


def leaves(value) -> list:
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in leaves(k) + leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in leaves(v)]
    return [value]


def test_metadata_names_the_bundle_by_name_and_hash_never_by_a_server_path(
        server, exported, image_root) -> None:
    status, meta = call(server, "/metadata")
    assert status == 200
    strings = [x for x in leaves(meta) if isinstance(x, str)]
    assert not [s for s in strings if os.path.isabs(s) or "/tmp" in s or "pytest-" in s]
    text = json.dumps(meta)
    assert str(exported["root"]) not in text and str(image_root) not in text
    manifest = json.loads((exported["bundle"] / "manifest.json").read_text())
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False).encode()).hexdigest()
    assert meta["bundle"] == {"id": digest[:12], "name": exported["bundle"].name,
                              "manifest_sha256": digest}
    assert meta["settings"]["bundle"] == exported["bundle"].name
    assert meta["settings"]["image_root"] == image_root.name
    assert meta["manifest"]["features"]["clip"] == Path(manifest["features"]["clip"]).name


def test_embed_endpoint_makes_each_line_breaking_id_its_items_error(server) -> None:
    status, body = call(server, "/embed", {"items": catalog_lines()})
    assert status == 200, body
    assert [i["item_id"] for i in body["items"]] == ["good0", "good1"]
    skipped = [e for e in body["errors"] if e["action"] == "skipped"]
    assert [(e["line"], e["item_id"]) for e in skipped] == \
        [(n, bad_id(c)) for n, c in enumerate(BREAKS, start=2)]


@pytest.mark.parametrize("k", ['"5"', "true", "false", "5.0", '"true"'])
def test_topk_k_is_strictly_an_integer(server, exported, k) -> None:
    user = json.dumps(ids_of(exported["bundle"] / "user_ids.txt")[0].decode())
    status, body = call(server, "/topk", raw=f'{{"users":[{user}],"k":{k}}}'.encode())
    assert status == 422 and body["detail"][0]["loc"] == ["body", "k"], body
    status, body = call(server, "/topk", raw=f'{{"users":[{user}],"k":5}}'.encode())
    assert status == 200 and len(body["results"][0]["items"]) == 5


def test_the_422_for_users_and_history_says_its_sentence_once(server, exported) -> None:
    user = ids_of(exported["bundle"] / "user_ids.txt")[0].decode()
    status, body = call(server, "/topk", {"users": [user], "history": ["x"], "k": 5})
    sentence = "give exactly one of 'users' and 'history'"
    assert status == 422 and json.dumps(body).count(sentence) == 1, body
