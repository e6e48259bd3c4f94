"""`cliper-prod serve --engine local`: the HTTP API under uvicorn worker processes, without Ray,
through the real command line on loopback (tests/conftest.py's `local_service`: two workers),
and its micro-batcher against `serve.batch`'s semantics. The hostile-input tests of
tests/test_serve_hostile.py run against this engine too."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.commands import cli
from cliper_prod.errors import RuntimeSetupError
from cliper_prod.runtime.recommender import Recommender
from cliper_prod.serving.batching import MicroBatcher
from tests.conftest import (READ_TIMEOUT_S, bundle_users, call, scrape, serve_local,
                            served_manifest)
from tests.test_recommender import assert_naive, naive_topk


def test_topk_answers_as_naive_numpy_and_the_python_api(local_service, exported) -> None:
    rec = Recommender(exported["bundle"], provider="cpu")
    user_ids, item_ids = rec.bundle.user_ids, rec.bundle.item_ids
    users, exclude = [3, 0, 17, 42], [item_ids[5], item_ids[9]]
    asked = [user_ids[u] for u in users]
    status, body = call(local_service, "/topk", {"users": asked, "k": 8, "exclude": exclude})
    assert status == 200, body
    assert body["results"] == rec.topk(asked, k=8, exclude=exclude)
    order, scores = naive_topk(exported["ckpt"], exported["catalog"], users, 8,
                               {item_ids.index(i) for i in exclude})
    assert_naive(body["results"], asked, order, scores, item_ids)


def test_concurrent_requests_merge_into_batches_and_answer_as_alone(local_service,
                                                                    exported) -> None:
    users = bundle_users(exported)[:48]
    before = scrape(local_service + "/metrics")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda u: call(local_service, "/topk", {"users": [u], "k": 7}),
                                users))
    after = scrape(local_service + "/metrics")
    assert all(status == 200 for status, _ in answers)
    assert [body["results"][0] for _, body in answers] == \
        Recommender(exported["bundle"], provider="cpu").topk(users, k=7)

    def grew(key: tuple) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)
    runs = grew(("cliper_topk_batch_requests_count", None, None, None))
    assert grew(("cliper_topk_batch_requests_sum", None, None, None)) == 48
    assert runs < 48  # some ONNX runs merged several requests
    assert grew(("cliper_topk_batch_requests_bucket", None, None, "1.0")) < runs


def _replicas(url: str) -> tuple[dict[str, dict], int]:
    """/metadata's ``engine`` by worker, asked until both workers answered; and the calls."""
    seen, calls = {}, 0
    while len(seen) < 2 and calls < 200:
        status, meta = call(url, "/metadata")
        assert status == 200, meta
        seen[meta["replica"]], calls = meta["engine"], calls + 1
    return seen, calls


def test_metrics_sum_every_workers_exact_counts(local_service, exported) -> None:
    users = bundle_users(exported)
    before = scrape(local_service + "/metrics")
    replicas, metadata_calls = _replicas(local_service)
    assert len(replicas) == 2  # both workers answered some of the calls
    statuses = [call(local_service, "/topk", {"users": [u], "k": 5})[0] for u in users[:3]]
    statuses.append(call(local_service, "/topk", {"users": ["nobody"], "k": 5})[0])
    statuses.append(call(local_service, "/embed", {"items": [
        {"item_id": "new-1", "title": "A blanket"}, {"item_id": "new-2", "image": "x.jpg"}]})[0])
    after = scrape(local_service + "/metrics")
    assert statuses == [200, 200, 200, 400, 200]
    expected = {("cliper_requests_total", "/metadata", "200", None): metadata_calls,
                ("cliper_requests_total", "/topk", "200", None): 3,
                ("cliper_requests_total", "/topk", "400", None): 1,
                ("cliper_requests_total", "/embed", "200", None): 1,
                ("cliper_items_embedded_total", None, None, None): 1,
                ("cliper_item_errors_total", "skipped", None, None): 1,  # no image, no text
                ("cliper_item_errors_total", "kept", None, None): 1,  # no image
                ("cliper_request_latency_ms_count", "/topk", None, None): 4,
                ("cliper_topk_batch_requests_count", None, None, None): 3,
                ("cliper_topk_batch_requests_bucket", None, None, "1.0"): 3}  # each alone
    assert {k: after.get(k, 0.0) - before.get(k, 0.0) for k in expected} == expected


def test_ray_is_never_imported(local_service) -> None:
    """Neither the workers (their sys.modules, through /metadata) nor the parent: no process
    of the engine has Ray's core library mapped."""
    replicas, _ = _replicas(local_service)
    assert list(replicas.values()) == [{"name": "local", "workers": 2,
                                        "ray_imported": False}] * 2
    workers = [int(replica.rsplit(":", 1)[1]) for replica in replicas]
    parent = {int(line.split()[1]) for pid in workers
              for line in Path(f"/proc/{pid}/status").read_text().splitlines()
              if line.startswith("PPid:")}
    assert len(parent) == 1
    for pid in workers + list(parent):  # `import ray` loads its core, ray/_raylet*.so
        assert "_raylet" not in Path(f"/proc/{pid}/maps").read_text(), pid


LIMITS = [  # (what, raw body or None for a chunked one, status, words of the detail)
    ("over 4096 users", json.dumps({"users": [f"u{i}" for i in range(4097)]}).encode(), 413,
     "at most 4096"),
    ("k NaN", b'{"users":["u"],"k":NaN}', 422, "NaN"),
    ("not JSON", b"{not json", 422, "JSON decode error"),
    ("unknown user", b'{"users":["nobody"],"k":5}', 400, "unknown user id"),
    ("k beyond max_k", None, 400, "at most 50"),
]


@pytest.mark.parametrize("what,raw,status,words", LIMITS, ids=[c[0] for c in LIMITS])
def test_limits_and_bad_requests_are_4xx_with_a_message(local_service, exported, what, raw,
                                                        status, words) -> None:
    raw = raw or json.dumps({"users": bundle_users(exported)[:1], "k": 51}).encode()
    got, answer = call(local_service, "/topk", raw=raw)
    assert got == status, answer
    assert words in json.dumps(answer["detail"])


@pytest.mark.parametrize("headers,status", [
    (b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", b" 411 "),
    (b"Content-Length: %d\r\n\r\n{" % ((1 << 20) + 1), b" 413 ")])  # the body never sent
def test_unlengthed_and_oversized_bodies_are_refused_before_reading(local_service, headers,
                                                                    status) -> None:
    """Over --max-request-bytes is a 413 from the headers alone (a client that reads answers
    only after sending the whole body, as urllib, sees the connection closed instead)."""
    with socket.create_connection(("127.0.0.1", int(local_service.rsplit(":", 1)[1])),
                                  timeout=30) as s:
        s.sendall(b"POST /topk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + headers)
        assert status in s.recv(4096).split(b"\r\n")[0] + b" "


def test_embed_health_and_schema_as_the_python_api(local_service, exported) -> None:
    records = [json.loads(line) for line in exported["policy_items"].read_text().splitlines()
               if line.startswith("{\"")]
    status, body = call(local_service, "/embed", {"items": records})
    assert status == 200, body
    bundle = body.pop("bundle")
    assert body == Recommender(exported["bundle"], provider="cpu",
                               image_root=exported["catalog"]).embed(records)
    assert body["errors"] and body["items"]
    assert call(local_service, "/healthz") == (200, {"status": "ok"})
    status, meta = call(local_service, "/metadata")
    assert meta["manifest"] == served_manifest(exported["bundle"])
    assert bundle == meta["bundle"]["id"] == meta["manifest"]["manifest_sha256"][:12]
    status, schema = call(local_service, "/openapi.json")
    assert {"/topk", "/embed", "/healthz", "/metadata"} <= set(schema["paths"])
    assert {"TopKRequest", "TopKResponse", "EmbedResponse"} <= set(schema["components"]["schemas"])


def test_sigterm_drains_a_request_in_flight_and_exits_0(exported, image_root, tmp_path) -> None:
    """A request whose body is still coming when SIGTERM arrives is answered; then the
    command exits 0, refuses connections and leaves no metrics folder behind."""
    folders = set(Path(tempfile.gettempdir()).glob("cliper-metrics-*"))
    url, proc = serve_local(exported, image_root, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"users": bundle_users(exported)[:1], "k": 3}).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /topk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(READ_TIMEOUT_S / 2)
            s.sendall(body[5:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["results"][0]["items"]
    assert "draining in-flight requests" in (tmp_path / "serve.log").read_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert set(Path(tempfile.gettempdir()).glob("cliper-metrics-*")) == folders


@pytest.mark.parametrize("args,words", [
    (["--replicas", "2"], "--replicas: only with --engine ray (this is --engine local)"),
    (["--print-config", "--address", "auto"], "--address, --print-config: only with --engine "
                                              "ray"),
    (["--engine", "ray", "--workers", "2"], "--workers: only with --engine local (this is "
                                            "--engine ray)")])
def test_the_other_engines_options_are_refused(exported, args, words) -> None:
    res = CliRunner().invoke(cli, ["serve", "--bundle", str(exported["bundle"]), *args])
    assert res.exit_code == 2 and f"error: {words}" in res.stderr, res.output


def test_a_port_in_use_is_one_line_and_exit_code_9(exported, monkeypatch) -> None:
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = CliRunner().invoke(cli, ["serve", "--bundle", str(exported["bundle"]), "--port",
                                       str(port)])
    assert res.exit_code == 9, res.output
    assert res.stderr == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"


def test_a_worker_that_cannot_load_fails_the_start_with_its_reason(tmp_path) -> None:
    from cliper_prod.serving.local_engine import LocalServer
    from cliper_prod.serving.service import ServeSettings

    server = LocalServer(ServeSettings(bundle=str(tmp_path / "gone")), port=0)
    with pytest.raises(RuntimeSetupError, match="did not start: .*gone: bundle folder not found"):
        server.start(timeout_s=60)


# -- the micro-batcher: serve.batch's semantics ---------------------------------------------

def _batched(max_batch_size: int, wait_s: float, run_s: float = 0.01, fail: bool = False):
    """A batcher over a fake graph run, and the (start time, items) of each run."""
    runs: list[tuple[float, list[int]]] = []

    async def run(items: list[int]) -> list[int]:
        runs.append((time.perf_counter(), items))
        await asyncio.sleep(run_s)
        if fail:
            raise ValueError("the graph failed")
        return [i * 10 for i in items]
    return MicroBatcher(run, max_batch_size, wait_s), runs


def test_concurrent_calls_merge_up_to_the_batch_size_and_get_their_own_results() -> None:
    batcher, runs = _batched(max_batch_size=4, wait_s=0.05)

    async def main() -> list[int]:
        return list(await asyncio.gather(*(batcher(i) for i in range(10))))
    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert [items for _, items in runs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_lone_call_waits_for_company_and_one_batch_runs_at_a_time() -> None:
    batcher, runs = _batched(max_batch_size=64, wait_s=0.02, run_s=0.05)

    async def main() -> float:
        start = time.perf_counter()
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.03)  # the batch [1] runs from 20 ms to 70 ms
        await asyncio.gather(first, batcher(2), batcher(3))
        return start
    start = asyncio.run(main())
    assert [items for _, items in runs] == [[1], [2, 3]]
    assert runs[0][0] - start >= 0.019  # the whole wait, though no other call came
    assert runs[1][0] - start >= 0.069  # queued behind the running batch, not beside it


def test_a_failed_batch_is_every_callers_failure() -> None:
    batcher, runs = _batched(max_batch_size=8, wait_s=0.01, fail=True)

    async def main() -> list:
        return await asyncio.gather(*(batcher(i) for i in range(3)), return_exceptions=True)
    answers = asyncio.run(main())
    assert [items for _, items in runs] == [[0, 1, 2]]
    assert all(isinstance(a, ValueError) and str(a) == "the graph failed" for a in answers)


def test_allowlist_per_user_exclusions_and_similar_items_answer_as_the_python_api(
        local_service, exported) -> None:
    rec = Recommender(exported["bundle"], provider="cpu")
    users, item_ids = bundle_users(exported)[:3], rec.bundle.item_ids
    per_user = [[item_ids[1]], [], [item_ids[2], item_ids[3]]]
    for allow in (None, item_ids[::3]):
        status, body = call(local_service, "/topk", {"users": users, "k": 6,
                                                     "exclude": [item_ids[0]],
                                                     "exclude_per_user": per_user,
                                                     "items": allow})
        assert status == 200, body
        ids, scores = rec.recommend(users, 6, exclude=[e + [item_ids[0]] for e in per_user],
                                    items=allow)
        assert [r["items"] for r in body["results"]] == [list(row) for row in ids]
        for got, want in zip(body["results"], scores):
            np.testing.assert_allclose(got["scores"], want, rtol=1e-6)
    status, body = call(local_service, "/similar", {"items": item_ids[:2], "k": 4})
    assert status == 200, body
    ids, scores = rec.similar_items(item_ids[:2], 4)
    assert [(r["item_id"], r["items"]) for r in body["results"]] == \
        [(i, list(row)) for i, row in zip(item_ids[:2], ids)]
    assert body["bundle"] == rec.bundle.manifest["manifest_sha256"][:12]
    assert call(local_service, "/topk", {"users": users, "exclude_per_user": [[]]})[0] == 422
    assert call(local_service, "/topk", {"history": item_ids[:2], "items": item_ids})[0] == 422
    assert call(local_service, "/similar", {"items": ["nope"], "k": 4})[0] == 400


def test_docs_load_nothing_from_elsewhere_and_embed_items_are_typed(local_service) -> None:
    import urllib.request

    with urllib.request.urlopen(local_service + "/docs", timeout=10) as response:
        page = response.read().decode()
    assert "/topk" in page and "/similar" in page and "EmbedRequest" in page
    assert "<script" not in page and "cdn" not in page.lower()
    assert "http://" not in page and "https://" not in page
    status, schema = call(local_service, "/openapi.json")
    item = schema["components"]["schemas"]["EmbedRequest"]["properties"]["items"]["items"]
    assert {"item_id", "title", "categories", "image", "image_base64"} <= set(item["properties"])
    assert item["required"] == ["item_id"]
