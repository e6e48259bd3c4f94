"""`serve` and `embed` under hostile input (issue 23): never a 500, no lost items, bounded time
to send a request, no server paths or object reprs in answers. Requests go as raw bytes to the
session's service of each engine on loopback (tests/conftest.py; `-k local` or `-k ray` picks
one), their CLI twins through `cliper-prod embed`."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import READ_TIMEOUT_S
from cliper_prod.commands import cli

LONG_NAME = "a" * 300 + ".png"


def post(url: str, path: str, raw: bytes, content_type: str = "application/json"
         ) -> tuple[int, dict]:
    """POST ``raw`` exactly as given; the status and the decoded JSON answer."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": content_type})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def known_user(exported) -> str:
    return (exported["bundle"] / "user_ids.txt").read_text().split()[0]


def embed_body(*items: str) -> bytes:
    """An /embed body of the items' JSON texts, as written (escapes kept literal)."""
    return ('{"items":[' + ",".join(items) + "]}").encode()


GOOD = '{"item_id":"g","title":"a good item"}'

#: (name, path, body text with U = a known user): refused whole, with a 4xx
REFUSED = [
    ("k NaN", "/topk", '{"users":["U"],"k":NaN}'),
    ("Infinity in an extra field", "/topk", '{"users":["U"],"k":5,"x":Infinity}'),
    ("-Infinity", "/topk", '{"users":["U"],"k":-Infinity}'),
    ("k 1e400", "/topk", '{"users":["U"],"k":1e400}'),
    ("integer of 5000 digits", "/topk", '{"users":["U"],"k":' + "9" * 5000 + "}"),
    ("NaN item", "/embed", '{"items":[NaN]}'),
    ("lone surrogate user", "/topk", '{"users":"\\ud800","k":5}'),
    ("lone surrogate in exclude", "/topk", '{"users":["U"],"exclude":["\\udfff"]}'),
    ("lone surrogate item id", "/embed", '{"items":[{"item_id":"\\ud800","title":"t"}]}'),
    ("lone surrogate absolute image", "/embed",
     '{"items":[{"item_id":"a","title":"t","image":"/\\ud800.png"}]}'),
    ("lone surrogate image", "/embed",
     '{"items":[' + GOOD + ',{"item_id":"b","title":"t","image":"\\ud800.png"}]}'),
    ("nesting 100000 deep", "/embed", '{"items":[' + "[" * 100_000 + "]" * 100_000 + "]}"),
    ("not UTF-8", "/topk", '{"users":["\xff"]}'),
    ("megabyte extra key", "/topk", '{"users":["U"],"' + "x" * 900_000 + '":1}'),
    ("megabyte users string", "/topk", '{"users":"' + "u" * 900_000 + '"}'),
]


@pytest.fixture(params=["local", "ray"])
def server(request) -> str:
    """The session's service of each engine (tests/conftest.py): one API, the same answers."""
    return request.getfixturevalue({"local": "local_service", "ray": "service"}[request.param])


def _encode(text: str) -> bytes:
    return text.encode("latin-1") if "\xff" in text else text.encode()


@pytest.mark.parametrize("name,path,text", REFUSED, ids=[c[0] for c in REFUSED])
def test_values_json_cannot_carry_are_a_422_with_a_short_message(server, exported, name, path,
                                                                 text) -> None:
    status, answer = post(server, path, _encode(text.replace('"U"', json.dumps(
        known_user(exported)))))
    assert status == 422, answer
    assert answer["detail"] and len(json.dumps(answer)) < 2000


def test_a_body_that_is_not_json_at_all_is_a_422_without_echo(server) -> None:
    status, answer = post(server, "/topk", b"\xff\xfe" * 1000, content_type="text/plain")
    assert status == 422 and len(json.dumps(answer)) < 2000


#: (name, image as sent, words the item's error reason must hold)
BAD_IMAGES = [
    ("null byte", "x\x00y", "null byte"),
    ("name too long", LONG_NAME, "File name too long"),
    ("symbolic link loop", "loop.png", "symbolic link"),
    ("a folder", "images", "not a regular file"),
    ("a FIFO", "fifo.png", "not a regular file"),
    ("missing", "images/none.png", "image not found: images/none.png"),
    ("outside the root", "../../../../etc/hostname", "outside the server's image root"),
]


@pytest.fixture(scope="module")
def fifo(image_root) -> None:
    """A named pipe among the images: opening it would block for ever."""
    if not (image_root / "fifo.png").exists():
        os.mkfifo(image_root / "fifo.png")


def test_each_bad_image_path_is_its_items_error_and_the_rest_is_embedded(server, image_root,
                                                                         fifo) -> None:
    items = [GOOD] + [json.dumps({"item_id": f"bad{i}", "title": "t", "image": image})
                      for i, (_, image, _) in enumerate(BAD_IMAGES)]
    items.append(json.dumps({"item_id": "b64", "title": "t", "image_base64": "aGVsbG8="}))
    status, answer = post(server, "/embed", embed_body(*items))
    assert status == 200, answer
    assert [i["item_id"] for i in answer["items"]] == \
        ["g"] + [f"bad{i}" for i in range(len(BAD_IMAGES))] + ["b64"]  # text fallback kept
    reasons = {e["item_id"]: e["reason"] for e in answer["errors"]}
    for i, (name, _, words) in enumerate(BAD_IMAGES):
        assert words in reasons[f"bad{i}"], (name, reasons[f"bad{i}"])
    assert "not a readable image (not a recognised image format): image_base64" == \
        reasons["b64"].split(";")[0]
    text = json.dumps(answer)
    assert str(image_root) not in text and "object at 0x" not in text
    assert "a" * 201 not in text  # the long name is quoted cut short


def test_echoed_ids_are_cut_short(server) -> None:
    huge = "u" * 500_000
    status, answer = post(server, "/topk", json.dumps({"users": [huge, "v" * 1000]}).encode())
    assert status == 400 and len(json.dumps(answer)) < 1000, len(json.dumps(answer))
    assert "unknown user" in answer["detail"]
    status, answer = post(server, "/embed", embed_body(json.dumps(
        {"item_id": "i" * 100_000, "title": "t", "image": "images/none.png"})))
    assert status == 200 and answer["errors"][0]["item_id"] == "i" * 200 + "…"


def _slow_client(url: str, results: list) -> None:
    """Headers announcing 1000 bytes, 10 of them sent: the seconds until the answer, its
    status line."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /topk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b'{"users":[')
        start = time.monotonic()
        first = s.recv(4096).split(b"\r\n")[0]
        results.append((time.monotonic() - start, first))


def test_a_slow_client_gets_a_408_in_time_while_others_are_answered(server, exported) -> None:
    slow: list = []
    threads = [threading.Thread(target=_slow_client, args=(server, slow)) for _ in range(8)]
    for t in threads:
        t.start()
    answered = []
    start = time.monotonic()
    while time.monotonic() - start < READ_TIMEOUT_S * 0.8:
        status, _ = post(server, "/topk", json.dumps({"users": [known_user(exported)],
                                                       "k": 3}).encode())
        answered.append(status)
    for t in threads:
        t.join(30)
    assert answered and set(answered) == {200}, answered
    assert len(slow) == 8
    for elapsed, status_line in slow:
        assert b" 408 " in status_line + b" ", status_line
        assert READ_TIMEOUT_S - 0.5 < elapsed < READ_TIMEOUT_S + 5, elapsed


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "\udc80", "x\x00y", LONG_NAME, "loop.png",
                     "images", "../" * 8 + "etc/passwd", "/etc/passwd"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
BODIES = st.one_of(
    JSON_VALUES.map(json.dumps),
    st.builds(lambda u, k: json.dumps({"users": u, "k": k}), JSON_VALUES, JSON_VALUES),
    st.builds(lambda i, t, im: json.dumps({"items": [{"item_id": i, "title": t, "image": im}]}),
              JSON_VALUES, JSON_VALUES, JSON_VALUES),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 200_000)),
    st.builds(lambda v: json.dumps({"items": [v]}), JSON_VALUES))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=BODIES, path=st.sampled_from(["/topk", "/embed"]))
def test_random_json_never_gets_a_500(server, fifo, body, path) -> None:
    status, answer = post(server, path, body.encode())
    assert status in (200, 400, 404, 413, 422), (status, answer)


def test_an_unexpected_exception_is_a_logged_500_with_a_request_id(caplog) -> None:
    from cliper_prod.serving.middleware import CatchAll

    async def broken(scope, receive, send) -> None:
        raise ZeroDivisionError("a bug")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/topk", "headers": [],
             "query_string": b""}
    with caplog.at_level(logging.ERROR, logger="cliper_prod.serving.middleware"):
        asyncio.run(CatchAll(broken)(scope, None, send))
    answer = json.loads(sent[1]["body"])
    assert sent[0]["status"] == 500 and answer["detail"] == "internal error"
    assert answer["request_id"] in caplog.text and "ZeroDivisionError" in caplog.text


def test_an_unexpected_exception_in_one_item_leaves_the_others_embedded(exported, monkeypatch,
                                                                        caplog) -> None:
    from cliper_prod.runtime.bundle_reader import Bundle
    from cliper_prod.runtime import item_embedder as handlers

    load = handlers.load_image

    def fails_for_boom(preprocess, item):
        if item.item_id == "boom":
            raise ZeroDivisionError("a bug")
        return load(preprocess, item)

    monkeypatch.setattr(handlers, "load_image", fails_for_boom)
    embedder = handlers.ItemEmbedder(Bundle(exported["bundle"], "cpu"), exported["catalog"])
    with caplog.at_level(logging.ERROR, logger="cliper_prod.runtime.item_embedder"):
        answer = embedder.embed([{"item_id": "a", "title": "t"},
                                 {"item_id": "boom", "title": "t", "image": "x.png"},
                                 {"item_id": "c", "title": "t"}])
    assert [i["item_id"] for i in answer["items"]] == ["a", "c"]
    error = {e["line"]: e for e in answer["errors"]}[2]
    assert error["action"] == "skipped"
    assert error["reason"].startswith("internal error (request id ")
    assert error["reason"][len("internal error (request id "):-1] in caplog.text


# -- the CLI twins: the same values in items.jsonl, one error record each, the batch kept ----

def test_embed_cli_gives_each_hostile_line_its_error_and_keeps_the_rest(exported,
                                                                        tmp_path) -> None:
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "images").symlink_to(exported["catalog"] / "images")
    (folder / "loop.png").symlink_to("loop.png")
    image = json.loads((exported["catalog"] / "items.jsonl").read_text().splitlines()[0])["image"]
    lines = {
        "good": json.dumps({"item_id": "good", "title": "a good item", "image": image}),
        "nan": '{"item_id":"nan","title":"t","x":NaN}',
        "inf": '{"item_id":"inf","title":"t","n":1e400}',
        "surrogate id": '{"item_id":"\\ud800","title":"t"}',
        "surrogate image": '{"item_id":"si","title":"t","image":"\\ud800.png"}',
        "null byte": '{"item_id":"nul","title":"t","image":"x\\u0000y"}',
        "long name": json.dumps({"item_id": "long", "title": "t", "image": LONG_NAME}),
        "loop": json.dumps({"item_id": "loop", "title": "t", "image": "loop.png"}),
        "folder": json.dumps({"item_id": "dir", "title": "t", "image": "images"}),
        "deep": '{"item_id":"deep","title":' + "[" * 100_000 + "]" * 100_000 + "}",
        "also good": json.dumps({"item_id": "good2", "title": "another good item"}),
    }
    (folder / "items.jsonl").write_text("\n".join(lines.values()) + "\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["embed", str(folder / "items.jsonl"), "--bundle",
                                   str(exported["bundle"]), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "item_ids.txt").read_text().split() == ["good", "nul", "long", "loop", "dir",
                                                         "good2"]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    by_line = {e["line"]: e for e in errors}
    expect = {2: "NaN is not a JSON number", 3: "beyond the range of a float",
              4: "lone surrogate", 5: "lone surrogate", 6: "null byte",
              7: "File name too long", 8: "symbolic link", 9: "not a regular file",
              10: "nested too deeply", 11: "no 'image' field"}
    assert sorted(by_line) == sorted(expect)
    for line, words in expect.items():
        assert words in by_line[line]["reason"], (line, by_line[line])
    assert all(by_line[n]["action"] == "skipped" for n in (2, 3, 4, 5, 10))
    assert all(by_line[n]["action"] == "kept" for n in (6, 7, 8, 9, 11))


# -- start-up failures: one line and exit code 9, never a traceback --------------------------

def _serve(exported, monkeypatch, *extra: str):
    import signal

    from cliper_prod.serving import ray_engine as app

    monkeypatch.setattr(app, "connect", lambda address=None, metrics_port=None: None)
    monkeypatch.setattr(app, "_check_gpus", lambda needed: None)  # asks the (absent) Ray
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    return CliRunner().invoke(cli, ["serve", "--engine", "ray", "--bundle",
                                    str(exported["bundle"]), "--port", "1", *extra])


def test_serve_start_up_failure_is_one_line_and_exit_code_9(exported, monkeypatch) -> None:
    import ray.exceptions

    from cliper_prod.serving import ray_engine as app

    def proxy_died(**_):
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(app.serve, "start", proxy_died)
    res = _serve(exported, monkeypatch)
    assert res.exit_code == 9, res.output
    assert res.output.startswith("error: Ray Serve did not start (ActorDiedError")
    assert "Traceback" not in res.output and len(res.output.splitlines()) == 1


def test_serve_start_up_timeout_is_the_users_to_set(exported, monkeypatch) -> None:
    from types import SimpleNamespace

    from ray.serve.schema import ApplicationStatus

    from cliper_prod.serving import ray_engine as app

    started = {}
    monkeypatch.setattr(app.serve, "start", lambda **kw: started.update(kw))
    monkeypatch.setattr(app.serve, "run_many", lambda *a, **kw: None)
    deploying = SimpleNamespace(status=ApplicationStatus.DEPLOYING, message="")
    monkeypatch.setattr(app.serve, "status",
                        lambda: SimpleNamespace(applications={app.APP_NAME: deploying}))
    begin = time.monotonic()
    res = _serve(exported, monkeypatch, "--startup-timeout-s", "1.5")
    assert res.exit_code == 9, res.output
    assert 1.5 <= time.monotonic() - begin < 10
    assert "not running after 1.5 s (DEPLOYING); raise --startup-timeout-s" in res.output
    env = started["controller_options"]["runtime_env"]["env_vars"]
    assert env == {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "1.5"}


def test_readiness_ranks_on_the_graph_caches_success_and_never_a_failure(exported) -> None:
    from cliper_prod.runtime.bundle_reader import Bundle
    from cliper_prod.runtime.ranking import TopKRanker
    from cliper_prod.serving.readiness import ReadinessProbe

    ranker, now, calls = TopKRanker(Bundle(exported["bundle"], "cpu")), [0.0], []

    def rank(rows):
        calls.append(rows)
        return ranker.rank(rows)
    probe = ReadinessProbe(rank, max_age_s=5.0, clock=lambda: now[0])
    probe.check()
    now[0] = 4.0
    probe.check()
    assert len(calls) == 1 and calls[0].tolist() == [0]  # one real ranking, then the cache
    now[0] = 9.5
    probe.check()
    assert len(calls) == 2

    def broken(rows):
        raise RuntimeError("session gone")
    failing = ReadinessProbe(broken, clock=lambda: now[0])
    for _ in range(2):  # a failure is reported every time, not cached
        with pytest.raises(RuntimeError, match="session gone"):
            failing.check()


def test_each_refusal_maps_to_its_http_status() -> None:
    """The runtime's QueryError is a 400 and UnsupportedQuery a 501 (histories on a bundle that
    cannot fold in); the service's own refusals keep their status."""
    from cliper_prod.runtime.ranking import KOutOfRange, QueryError, UnsupportedQuery
    from cliper_prod.serving.api import unanswerable
    from cliper_prod.serving.service import RequestError

    cases = [(QueryError("unknown user id(s) 'x'"), 400), (KOutOfRange(500, 100), 400),
             (UnsupportedQuery("this bundle has no fold-in state"), 501),
             (RequestError("5000 users; at most 4096 per request", 413), 413)]
    for error, status in cases:
        answer = asyncio.run(unanswerable(None, error))
        assert answer.status_code == status
        assert json.loads(answer.body) == {"detail": str(error)}
