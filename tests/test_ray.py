"""Ray: the HTTP service against the command-line tools, and `embed --ray` against the
single-process embed, on a local Ray instance started here (CPU)."""

from __future__ import annotations

import base64
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.commands import cli
from tests.conftest import bundle_users, call, served_manifest, widened


def cli_topk(exported, tmp_path: Path, users: list[str], k: int) -> list[dict]:
    users_file = tmp_path / "u.txt"
    users_file.write_text("\n".join(users) + "\n")
    out = tmp_path / "recs.jsonl"
    res = CliRunner().invoke(cli, ["topk", "--users", str(users_file), "--bundle",
                                   str(exported["bundle"]), "-k", str(k), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return [widened(json.loads(line)) for line in out.read_text().splitlines()]


def test_topk_answers_as_the_cli(service, exported, tmp_path) -> None:
    users = bundle_users(exported)[:100]
    status, body = call(service, "/topk", {"users": users, "k": 10})
    assert status == 200, body
    assert body["results"] == cli_topk(exported, tmp_path, users, 10)


def test_concurrent_topk_requests_batched_together_answer_as_the_cli(service, exported,
                                                                    tmp_path) -> None:
    users = bundle_users(exported)[:48]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda u: call(service, "/topk", {"users": [u], "k": 7}), users))
    assert all(status == 200 for status, _ in answers)
    assert [body["results"][0] for _, body in answers] == cli_topk(exported, tmp_path, users, 7)


def test_topk_exclusions_drop_items_and_still_fill_k(service, exported, tmp_path) -> None:
    user = bundle_users(exported)[3]
    full = cli_topk(exported, tmp_path, [user], 12)[0]
    drop = full["items"][:2]
    status, body = call(service, "/topk", {"users": [user], "k": 10, "exclude": drop})
    assert status == 200, body
    assert body["results"][0]["items"] == full["items"][2:12]
    assert body["results"][0]["scores"] == full["scores"][2:12]


def _policy_records(exported) -> list[dict]:
    """The fixture's per-item policy cases that are JSON objects, plus a base64 image."""
    records = []
    for line in exported["policy_items"].read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    image = exported["catalog"] / records[0]["image"]
    records.append({"item_id": "B64", "title": records[0].get("title", "t"),
                    "image_base64": base64.b64encode(image.read_bytes()).decode()})
    return records


def test_embed_answers_as_the_cli(service, exported, tmp_path) -> None:
    records = _policy_records(exported)
    # the CLI reads the same items from a file in the catalog folder (same image paths); the
    # base64 item is given there as the path of the same file
    as_file = [r if "image_base64" not in r else
               {k: v for k, v in {**r, "image": records[0]["image"]}.items()
                if k != "image_base64"} for r in records]
    items_file = exported["catalog"] / "served.jsonl"
    items_file.write_text("".join(json.dumps(r) + "\n" for r in as_file))
    out = tmp_path / "emb"
    res = CliRunner().invoke(cli, ["embed", str(items_file), "--bundle", str(exported["bundle"]),
                                   "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    status, body = call(service, "/embed", {"items": records})
    assert status == 200, body
    ids = (out / "item_ids.txt").read_text().split()
    assert [i["item_id"] for i in body["items"]] == ids
    np.testing.assert_array_equal(
        np.array([i["text_feature"] for i in body["items"]], np.float32),
        np.load(out / "text_feat.npy"))
    np.testing.assert_array_equal(
        np.array([i["image_embedding"] for i in body["items"]], np.float32),
        np.load(out / "image_feat.npy"))
    cli_errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert body["errors"] == cli_errors
    assert {e["item_id"] for e in cli_errors} >= {"T1", "T2"}  # the policy cases are exercised


def test_embed_refuses_images_outside_its_root_per_item(service, exported) -> None:
    status, body = call(service, "/embed", {"items": [
        {"item_id": "x", "title": "a title", "image": "../../../../etc/hostname"},
        {"item_id": "y", "title": "a title", "image_base64": "not base64!"}]})
    assert status == 200, body
    reasons = {e["item_id"]: e["reason"] for e in body["errors"]}
    assert "outside the server's image root" in reasons["x"]
    assert "not valid base64" in reasons["y"]
    assert [i["item_id"] for i in body["items"]] == ["x", "y"]  # kept with the text fallback


BAD_REQUESTS = [
    ("/topk", {"users": ["no-such-user"], "k": 5}, 400, "unknown user"),
    ("/topk", {"users": [], "k": 5}, 422, ""),
    ("/topk", {"users": ["U0"], "k": 0}, 422, ""),
    ("/topk", {"users": ["U0"], "k": 51}, 400, "at most 50"),
    ("/topk", {"users": "U0", "k": 5}, 422, ""),
    ("/topk", {"users": [1, 2], "k": 5}, 422, ""),
    ("/topk", {"users": ["U0"], "k": 5, "typo": 1}, 422, ""),
    ("/topk", {"users": ["U0"], "k": 49, "exclude": ["I0", "I1"]}, 400, "exceeds"),
    ("/topk", {"users": ["U0"], "exclude": ["nope"]}, 400, "unknown item"),
    ("/topk", {"users": [f"u{i}" for i in range(101)]}, 413, "at most 100"),
    ("/embed", {"items": []}, 422, ""),
    ("/embed", {"items": ["not an object"]}, 422, ""),
    ("/embed", {"items": [{"item_id": str(i)} for i in range(65)]}, 413, "at most 64"),
]


@pytest.mark.parametrize("path,body,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_a_message(service, exported, path, body, status,
                                               message) -> None:
    users, items = bundle_users(exported), (exported["bundle"] / "item_ids.txt").read_text().split()
    text = json.dumps(body).replace('"U0"', json.dumps(users[0]))
    text = text.replace('"I0"', json.dumps(items[0])).replace('"I1"', json.dumps(items[1]))
    got, answer = call(service, path, raw=text.encode())
    assert got == status, answer
    assert message in json.dumps(answer["detail"])


def test_malformed_oversized_and_unlengthed_bodies_are_4xx(service) -> None:
    assert call(service, "/topk", raw=b"{not json")[0] == 422
    assert call(service, "/topk", raw=b"")[0] == 422
    assert call(service, "/topk", raw=b"x" * ((1 << 20) + 1))[0] == 413
    assert call(service, "/topk", method="GET")[0] == 405
    with socket.create_connection(("127.0.0.1", int(service.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /topk HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n")[0] + b" "


def test_health_metadata_and_openapi(service, exported) -> None:
    assert call(service, "/healthz") == (200, {"status": "ok"})
    status, meta = call(service, "/metadata")
    assert status == 200 and meta["manifest"] == served_manifest(exported["bundle"])
    # each live session's providers, as ONNX Runtime reports them
    assert meta["providers"] == {name: ["CPUExecutionProvider"]
                                 for name in ("topk", "image_encoder", "text_fusion")}
    status, schema = call(service, "/openapi.json")
    assert status == 200
    assert {"/topk", "/embed", "/healthz", "/metadata"} <= set(schema["paths"])
    assert "TopKRequest" in schema["components"]["schemas"]


def _embed(exported, out: Path, *extra: str) -> CliRunner:
    return CliRunner().invoke(cli, ["embed", str(exported["policy_items"]), "--bundle",
                                    str(exported["bundle"]), "--out", str(out), "--quiet",
                                    "--batch-size", "2", "--shard-items", "4", *extra])


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_embed_on_ray_is_byte_identical_to_one_process(local_ray, exported, tmp_path) -> None:
    assert _embed(exported, tmp_path / "one").exit_code == 0
    res = _embed(exported, tmp_path / "ray", "--ray")
    assert res.exit_code == 0, res.output
    _same_files(tmp_path / "one", tmp_path / "ray")
    assert "{not json" not in (tmp_path / "ray" / "errors.jsonl").read_text()
    assert len((tmp_path / "ray" / "errors.jsonl").read_text().splitlines()) >= 4


def test_embed_on_ray_over_shards_is_byte_identical(local_ray, exported, tmp_path) -> None:
    """Two shards, a batch of two that spans them: the same bytes as one process, whose rows
    are those of the unsplit file."""
    lines = exported["policy_items"].read_text().splitlines(keepends=True)
    folder = tmp_path / "items"
    folder.mkdir()
    (folder / "p1.jsonl").write_text("".join(lines[:3]))
    (folder / "p2.jsonl").write_text("".join(lines[3:]))
    (folder / "images").symlink_to(exported["policy_items"].parent / "images")
    runs = {}
    for name, items, extra in [("file", exported["policy_items"], ()), ("one", folder, ()),
                               ("ray", folder, ("--ray",))]:
        res = CliRunner().invoke(cli, ["embed", str(items), "--bundle", str(exported["bundle"]),
                                       "--out", str(tmp_path / name), "--quiet", "--batch-size",
                                       "2", "--shard-items", "4", *extra])
        assert res.exit_code == 0, res.output
        runs[name] = tmp_path / name
    _same_files(runs["one"], runs["ray"])
    for name in ["image_feat.npy", "text_feat.npy", "item_ids.txt"]:
        assert (runs["file"] / name).read_bytes() == (runs["one"] / name).read_bytes(), name
    errors = [json.loads(x) for x in (runs["ray"] / "errors.jsonl").read_text().splitlines()]
    unsplit = [json.loads(x) for x in (runs["file"] / "errors.jsonl").read_text().splitlines()]
    assert [(e["file"], e["line"]) for e in errors] == \
        [("p1.jsonl", e["line"]) if e["line"] <= 3 else ("p2.jsonl", e["line"] - 3)
         for e in unsplit]


def test_embed_on_ray_resumes_after_an_interruption(local_ray, exported, tmp_path,
                                                    monkeypatch) -> None:
    from cliper_prod.features.shards import ShardStore

    assert _embed(exported, tmp_path / "one").exit_code == 0
    write = ShardStore.write

    def write_then_die(self, shard):
        write(self, shard)
        if self.count == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardStore, "write", write_then_die)
    res = _embed(exported, tmp_path / "ray", "--ray")
    assert res.exit_code == 130, res.output  # Ctrl-C
    monkeypatch.setattr(ShardStore, "write", write)
    assert len(list((tmp_path / "ray" / ".embed-work").glob("shard-*.npz"))) == 2
    res = _embed(exported, tmp_path / "ray", "--ray", "--resume")
    assert res.exit_code == 0, res.output
    _same_files(tmp_path / "one", tmp_path / "ray")


def test_embed_on_ray_strict_stops_and_writes_nothing(local_ray, exported, tmp_path) -> None:
    res = _embed(exported, tmp_path / "ray", "--ray", "--strict")
    assert res.exit_code == 3
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir())


def test_embed_ray_needs_a_bundle(exported, tmp_path) -> None:
    res = CliRunner().invoke(cli, ["embed", str(exported["policy_items"]), "--clip",
                                   str(exported["clip"]), "--out", str(tmp_path / "x"), "--ray"])
    assert res.exit_code == 2 and "--bundle" in res.output


def test_a_replica_whose_session_broke_is_replaced_by_serve(service, exported) -> None:
    """The replica's check_health is the readiness probe: once its ONNX session is gone, the
    probe fails, Ray Serve replaces the replica, and the new one answers."""
    import time

    from ray import serve

    from cliper_prod.serving.ray_engine import CliperService, ServeSettings

    class BreakableService(CliperService.func_or_class):
        def break_session(self) -> None:
            self.service.live.ranker.graph = None  # as if ONNX Runtime's sessions died

    deployment = serve.deployment(BreakableService, name="BreakableService",
                                  health_check_period_s=1, health_check_timeout_s=30)
    handle = serve.run(deployment.bind(ServeSettings(bundle=str(exported["bundle"]))),
                       name="breakable", route_prefix="/breakable")
    try:
        status, before = call(service, "/breakable/metadata")
        assert status == 200 and call(service, "/breakable/healthz")[0] == 200
        handle.break_session.remote().result()
        time.sleep(6)  # past the probe's 5 s trust in its last success
        assert call(service, "/breakable/healthz")[0] == 503
        deadline, after = time.monotonic() + 120, before
        while time.monotonic() < deadline and after.get("replica") in (None, before["replica"]):
            time.sleep(1)
            status, after = call(service, "/breakable/metadata")
        assert after.get("replica") not in (None, before["replica"])  # a new replica
        status, body = call(service, "/breakable/topk", {"users": bundle_users(exported)[:2],
                                                         "k": 3})
        assert status == 200 and len(body["results"]) == 2
    finally:
        serve.delete("breakable")


def test_a_bundle_swapped_under_load_on_ray_answers_from_one_bundle(service, exported,
                                                                    tmp_path) -> None:
    """The Ray engine's replicas swap too: a second application on the running Serve, its
    bundle link switched under 8 clients."""
    import os

    from ray import serve

    from cliper_prod.serving.ray_engine import ServeSettings, service_deployment
    from tests.test_serve_swap import (assert_one_bundle_each, expected_answers, second_bundle,
                                       swapped_under_load)

    b = second_bundle(exported["bundle"], tmp_path / "b")
    link = tmp_path / "current"
    os.symlink(exported["bundle"], link)
    users = bundle_users(exported)
    answers = dict([expected_answers(exported["bundle"], users, 5), expected_answers(b, users, 5)])
    settings = ServeSettings(bundle=str(link), reload_poll_s=0.5)
    serve.run(service_deployment(settings, replicas=1).options(name="Swapping").bind(settings),
              name="swapping", route_prefix="/swapping")
    try:
        log, (swapped,) = swapped_under_load(service + "/swapping", link, [(1.5, b), (6.0, None)],
                                             users)
        assert_one_bundle_each(log, answers, *answers, swapped)
    finally:
        serve.delete("swapping")
