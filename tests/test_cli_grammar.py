"""One command-line grammar (README, "Command-line conventions"): what every command's --help
shows, the deprecated spellings that still work, README's synopses checked against --help, and
the small output defects of the CLI (strict embed's folder, random-weight reporting, float32
scores)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.commands import cli
from cliper_prod.commands.common import GrammarOption

README = Path(__file__).resolve().parents[1] / "README.md"
#: commands whose work reports progress, so take -q/--quiet
PROGRESS_COMMANDS = ("train", "compare", "ablate-fusion", "embed", "export", "add-items", "topk",
                     "demo")
PATH_METAVARS = {"DIR", "FILE", "PATH", "DIR|HUB_ID", "[ITEMS]", "[CHECKPOINT]", "[OUT]"}


def run(*args: object) -> click.testing.Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def names(param: click.Parameter) -> list[str]:
    """A parameter's spellings on the command line, its deprecated ones left out."""
    old = param.old_names if isinstance(param, GrammarOption) else ()
    return [n for n in (*param.opts, *param.secondary_opts) if n not in old]


def options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


@pytest.mark.parametrize("name", list(cli.commands))
def test_every_option_has_help_and_every_path_says_its_kind(name: str) -> None:
    command = cli.commands[name]
    for param in options(command):
        assert param.help and param.help.strip(), (name, param.opts)
    for param in command.params:
        if isinstance(param.type, click.Path):
            assert param.metavar in PATH_METAVARS, (name, param.name, param.metavar)
        if "--out" in param.opts:
            assert param.metavar in ("DIR", "FILE"), (name, param.metavar)
    quiet = [p for p in options(command) if "--quiet" in p.opts]
    assert (name in PROGRESS_COMMANDS) == bool(quiet), name
    assert not quiet or quiet[0].opts == ["-q", "--quiet"], name


def test_strictness_is_one_flag_pair_everywhere() -> None:
    for name, command in cli.commands.items():
        spelled = {n for p in options(command) for n in names(p)}
        assert "--skip-unknown" not in spelled and "--lenient" not in spelled
        if name in ("embed", "add-items", "topk"):
            strict = next(p for p in options(command) if p.name == "strict")
            assert names(strict) == ["--strict", "--skip-bad"], name
    defaults = {n: next(p for p in options(cli.commands[n]) if p.name == "strict").default
                for n in ("embed", "add-items", "topk")}
    assert defaults == {"embed": False, "add-items": False, "topk": True}  # unchanged


def test_help_marks_each_deprecated_spelling() -> None:
    for name, old in [("topk", "--skip-unknown"), ("topk", "--device"),
                      ("add-items", "--device"), ("serve", "--device"),
                      ("synthetic", "--users"), ("synthetic", "--items")]:
        res = run(name, "--help")
        assert res.exit_code == 0
        flat = " ".join(res.output.split())
        assert re.search(rf"\[deprecated spelling: {old}\]", flat.replace("- ", "-")), \
            (name, old, res.output)


def readme_synopses() -> dict[str, set[str]]:
    """The option names each command's synopses use in README's "## Commands" block."""
    text = README.read_text()
    block = text.split("## Commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    found: dict[str, set[str]] = {}
    for line in joined.splitlines():
        match = re.match(r"cliper-prod ([a-z-]+)(.*)", line.strip())
        if match:
            spelled = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*|-[a-zA-Z])(?![\w-])",
                                     match.group(2)))
            found.setdefault(match.group(1), set()).update(spelled)
    return found


def test_readme_synopses_name_every_option_of_every_command_and_no_other() -> None:
    synopses = readme_synopses()
    assert set(synopses) == set(cli.commands), set(cli.commands) ^ set(synopses)
    for name, command in cli.commands.items():
        current = {n for p in options(command) for n in names(p)}
        missing, unknown = current - {"-q"} - synopses[name], synopses[name] - current
        assert not missing and not unknown, (name, "missing", missing, "not options", unknown)


def unknown_users(exported, tmp_path: Path) -> Path:
    users = (exported["bundle"] / "user_ids.txt").read_text().split()[:4]
    path = tmp_path / "users.txt"
    path.write_text(f"{users[0]}\nNOBODY\n{users[1]}\n{users[2]}\n")
    return path


def test_old_spellings_work_warn_once_and_give_the_same_output(exported, tmp_path) -> None:
    users = unknown_users(exported, tmp_path)
    base = ("topk", "--bundle", exported["bundle"], "--users", users, "-k", 5)
    new = run(*base, "--skip-bad", "--provider", "cpu")
    old = run(*base, "--skip-unknown", "--device", "cpu")
    assert new.exit_code == old.exit_code == 0, old.output
    assert new.stdout == old.stdout and len(new.stdout.splitlines()) == 3
    assert "deprecated" not in new.stderr
    warnings = [line for line in old.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: --skip-unknown is deprecated and goes in the next release; use --skip-bad",
        "warning: --device is deprecated and goes in the next release; use --provider"]
    strict = run(*base)  # topk's default stays strict
    assert strict.exit_code == 3 and "NOBODY" in strict.stderr and "--skip-bad" in strict.stderr


def test_histories_take_user_id_and_the_old_user_key(exported, tmp_path) -> None:
    items = (exported["bundle"] / "item_ids.txt").read_text().split()
    rows = [(f"h{n}", items[n:n + 3]) for n in range(3)]
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    new.write_text("".join(json.dumps({"user_id": u, "history": h}) + "\n" for u, h in rows))
    old.write_text("".join(json.dumps({"user": u, "history": h}) + "\n" for u, h in rows))
    a = run("topk", "--bundle", exported["bundle"], "--histories", new, "-k", 4)
    b = run("topk", "--bundle", exported["bundle"], "--histories", old, "-k", 4)
    assert a.exit_code == b.exit_code == 0, b.output
    assert a.stdout == b.stdout
    assert [json.loads(line)["user_id"] for line in a.stdout.splitlines()] == ["h0", "h1", "h2"]
    assert "deprecated" not in a.stderr
    assert b.stderr.count('"user" is deprecated') == 1  # once a file, not once a line
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"user": "a", "user_id": "b", "history": items[:2]}) + "\n")
    res = run("topk", "--bundle", exported["bundle"], "--histories", both)
    assert res.exit_code == 3 and "both 'user_id' and its deprecated spelling" in res.stderr


def test_synthetic_counts_have_their_own_names(tmp_path) -> None:
    a = run("synthetic", "--out", tmp_path / "a", "--n-users", 30, "--n-items", 40)
    b = run("synthetic", tmp_path / "b", "--users", 30, "--items", 40)
    assert a.exit_code == b.exit_code == 0, b.output
    for name in ("synthetic.inter", "items.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert b.stderr.count("is deprecated") == 2
    assert run("synthetic", tmp_path / "c", "--out", tmp_path / "d").exit_code == 2


def test_embed_takes_its_catalog_as_argument_or_items(exported, tmp_path) -> None:
    items = exported["catalog"] / "items.jsonl"
    common = ("--bundle", exported["bundle"], "--out")
    a = run("embed", items, *common, tmp_path / "a", "-q")
    b = run("embed", "--items", items, *common, tmp_path / "b", "-q")
    assert a.exit_code == b.exit_code == 0, b.output
    for name in ("image_feat.npy", "text_feat.npy", "item_ids.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for args in [(items, "--items", items), ()]:
        res = run("embed", *args, *common, tmp_path / "c")
        assert res.exit_code == 2 and "pass ITEMS (or --items ITEMS), once" in res.stderr
    assert not (tmp_path / "c").exists()


def test_strict_embed_creates_nothing_and_never_removes_a_users_folder(exported,
                                                                       tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = (exported["catalog"] / "items.jsonl").read_text().splitlines()[:3]
    bad.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    fresh = tmp_path / "new" / "deeper" / "out"
    res = run("embed", bad, "--bundle", exported["bundle"], "--out", fresh, "--strict", "-q")
    assert res.exit_code == 3 and "malformed JSON" in res.stderr, res.output
    assert not (tmp_path / "new").exists()  # every folder this run made is gone
    mine = tmp_path / "mine"
    mine.mkdir()
    res = run("embed", bad, "--bundle", exported["bundle"], "--out", mine, "--strict", "-q")
    assert res.exit_code == 3
    assert mine.is_dir() and not any(mine.iterdir())  # the user's folder stays, as it was


def test_a_saved_random_weight_clip_is_reported_and_exported_as_saved(exported,
                                                                      tmp_path) -> None:
    """The fixture's CLIP is the demo's: random weights saved to a folder, then loaded."""
    summary = json.loads((exported["catalog"] / "cliper" / "embed_summary.json").read_text())
    assert summary["random_weights"] is True and summary["built_from_config"] is False
    manifest = json.loads((exported["bundle"] / "manifest.json").read_text())
    assert manifest["features"]["random_weights"] is True
    assert manifest["features"]["built_from_config"] is False
    # the bundle's graphs hold the weights the features were embedded with, not new ones
    res = run("embed", exported["catalog"] / "items.jsonl", "--bundle", exported["bundle"],
              "--out", tmp_path / "onnx", "-q")
    assert res.exit_code == 0 and "RANDOM weights" in res.stderr, res.output
    torch_feat = np.load(exported["catalog"] / "cliper" / "image_feat.npy")
    onnx_feat = np.load(tmp_path / "onnx" / "image_feat.npy")
    cos = (torch_feat * onnx_feat).sum(1) / (np.linalg.norm(torch_feat, axis=1)
                                             * np.linalg.norm(onnx_feat, axis=1))
    assert cos.min() > 0.999, cos.min()


def test_summaries_before_built_from_config_keep_their_meaning(tmp_path) -> None:
    from dataclasses import asdict

    from cliper_prod.export.feature_graphs import feature_settings
    from cliper_prod.features.views import ViewSpec

    summary = {"clip": "c", "fusion": "sa", "tau": 0.1, "view_spec": asdict(ViewSpec())}
    for stored, rebuilt in [({"random_weights": True}, True),  # old: meant built from config
                            ({"random_weights": True, "built_from_config": False}, False),
                            ({"random_weights": False, "built_from_config": True}, True)]:
        (tmp_path / "embed_summary.json").write_text(json.dumps({**summary, **stored}))
        assert feature_settings(tmp_path, None, False).random_init is rebuilt, stored


def test_topk_writes_each_float32_score_in_its_shortest_exact_form(exported, tmp_path) -> None:
    from cliper_prod.runtime.bundle_reader import Bundle
    from cliper_prod.runtime.ranking import TopKRanker

    users = (exported["bundle"] / "user_ids.txt").read_text().split()[:10]
    path = tmp_path / "u.txt"
    path.write_text("\n".join(users) + "\n")
    res = run("topk", "--bundle", exported["bundle"], "--users", path, "-k", 8, "--out",
              tmp_path / "r.jsonl")
    assert res.exit_code == 0, res.output
    ranker = TopKRanker(Bundle(exported["bundle"], "cpu"))
    _, scores = ranker.rank(np.array([ranker.user_index[u] for u in users]))
    for line, expected in zip((tmp_path / "r.jsonl").read_text().splitlines(), scores):
        tokens = re.search(r'"scores": \[([^\]]*)\]', line).group(1).split(", ")
        parsed = np.array([np.float32(t) for t in tokens], dtype=np.float32)
        assert np.array_equal(parsed, expected[:len(parsed)])  # exact float32 round trip
        for token, value in zip(tokens, parsed):
            digits = len(re.sub(r"[-.]", "", token.split("e")[0]).strip("0") or "0")
            assert digits <= 9, token  # float32 never needs more than 9 significant digits
            if digits > 1:  # and no decimal one digit shorter reads back to the same float32
                assert np.float32(f"{value.item():.{digits - 2}e}") != value, token


def test_strict_add_items_leaves_no_folder_it_created(exported, tmp_path) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    known = (exported["bundle"] / "item_ids.txt").read_text().split()[0]
    (feats / "item_ids.txt").write_text(f"NEW0\n{known}\n")  # the second is in the bundle
    source = exported["catalog"] / "cliper"
    for name in ("image_feat.npy", "text_feat.npy"):
        np.save(feats / name, np.load(source / name)[:2])
    out = tmp_path / "made" / "here" / "b2"
    res = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out", out,
              "--strict", "-q")
    assert res.exit_code == 3 and known in res.stderr, res.output
    assert not (tmp_path / "made").exists()
    ok = run("add-items", "--bundle", exported["bundle"], "--features", feats, "--out", out,
             "--skip-bad", "-q")
    assert ok.exit_code == 0 and "added 1 item(s)" in ok.stderr, ok.output
