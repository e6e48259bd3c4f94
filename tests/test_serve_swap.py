"""Live bundle swaps: `cliper-prod serve --bundle LINK` swaps in the bundle a switched link
points to, under load, through the real command line and HTTP on loopback."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from cliper_prod.runtime.recommender import Recommender
from cliper_prod.serving.batching import batch
from cliper_prod.serving.metrics import ServiceMetrics
from cliper_prod.serving.service import ServeSettings, Service
from tests.conftest import call, serve_local, stop_process

CLIENTS = 8
POLL_S = 0.5


def switch(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a new link renamed over the old one)."""
    tmp = link.with_name(link.name + ".new")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def second_bundle(source: Path, out: Path) -> Path:
    """A bundle with the same ids as ``source`` and other scores (item table reversed, minus)."""
    import torch

    from cliper_prod.export.bundle_writer import EmbeddingTables, GraphOptions, export_tables

    rec = Recommender(source, provider="cpu")
    tables = {name: np.load(source / file) for name, file in
              rec.bundle.manifest["tables"].items()}
    counts = np.diff(tables["history_indptr"])
    train = np.stack([np.repeat(np.arange(len(counts)), counts),
                      tables["history_items"].astype(np.int64)], 1)
    export_tables(EmbeddingTables(torch.from_numpy(tables["users"]),
                                  torch.from_numpy(-tables["items"][::-1].copy()), train,
                                  rec.bundle.user_ids, rec.bundle.item_ids),
                  out, options=GraphOptions(max_k=50, torchscript=False, fp16=False,
                                            fused=False, gpu_form=False))
    return out


def expected_answers(bundle: Path, users: list[str], k: int) -> tuple[str, dict[str, dict]]:
    """The bundle's id and its ranking of each user, from the Python API."""
    rec = Recommender(bundle, provider="cpu")
    return rec.bundle.manifest["manifest_sha256"][:12], \
        {r["user_id"]: r for r in rec.topk(users, k=k)}


def load(url: str, users: list[str], stop: threading.Event, log: list, seed: int) -> None:
    """One client: requests back to back until ``stop``, each logged with its start time."""
    rng = random.Random(seed)
    while not stop.is_set():
        started = time.monotonic()
        status, body = call(url, "/topk", {"users": rng.sample(users, 3), "k": 5})
        log.append((started, status, body))


def swapped_under_load(url: str, link: Path, steps: list[tuple[float, Path | None]],
                       users: list[str]) -> tuple[list, list[float]]:
    """:data:`CLIENTS` clients at full load while ``link`` is switched at each step (after its
    wait, to its target; None: only wait); the log of requests and the times of the switches."""
    stop, log, switched = threading.Event(), [], []
    clients = [threading.Thread(target=load, args=(url, users, stop, log, n))
               for n in range(CLIENTS)]
    try:
        for client in clients:
            client.start()
        for wait_s, target in steps:
            time.sleep(wait_s)
            if target is not None:
                switch(link, target)
                switched.append(time.monotonic())
    finally:
        stop.set()
        for client in clients:
            client.join()
    return log, switched


def assert_one_bundle_each(log: list, answers: dict[str, dict], before: str, after: str,
                           swapped: float, within_s: float = 5.0) -> None:
    """No request failed; each answer is one bundle's (its id, its items and scores); those
    started before the switch are ``before``'s, those ``within_s`` after it ``after``'s."""
    assert [s for _, s, _ in log if s != 200] == []
    for _, _, body in log:
        assert body["bundle"] in answers
        for result in body["results"]:
            expected = answers[body["bundle"]][result["user_id"]]
            assert result["items"] == expected["items"]
            np.testing.assert_allclose(result["scores"], expected["scores"], rtol=1e-6)
    ids = [(started, body["bundle"]) for started, _, body in log]
    assert {i for t, i in ids if t < swapped} == {before}
    assert {i for t, i in ids if t > swapped + within_s} == {after}
    first = min(t for t, i in ids if i == after)
    print(f"{len(log)} requests; the new bundle answered {first - swapped:.2f} s after the "
          f"switch")


def test_a_bundle_swapped_under_load_answers_every_request_from_one_bundle(
        exported, image_root, tmp_path: Path) -> None:
    """8 clients at full load; the link switched to a new bundle, then to a broken one: no
    request fails, each answer is exactly one bundle's (its id and its scores), every request
    started 5 s after the switch is the new bundle's, and the broken bundle is refused while
    the new one keeps serving."""
    b = second_bundle(exported["bundle"], tmp_path / "b")
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    (broken / "topk.onnx").write_bytes(b"not a graph")  # its hash no longer matches
    link = tmp_path / "current"
    os.symlink(exported["bundle"], link)
    users = (exported["bundle"] / "user_ids.txt").read_text().split()
    answers = dict([expected_answers(exported["bundle"], users, 5), expected_answers(b, users, 5)])
    a_id, b_id = answers
    url, proc = serve_local({**exported, "bundle": link}, image_root, tmp_path, "--workers", "2",
                            "--reload-poll-s", str(POLL_S))
    try:
        log, (swapped, refused) = swapped_under_load(url, link, [(1.5, b), (5.5, broken),
                                                                 (2.5, None)], users)
        assert_one_bundle_each(log, answers, a_id, b_id, swapped)
        assert sum(t > refused for t, _, _ in log) > 10  # answered by b after the broken one
        assert call(url, "/metadata")[1]["bundle"]["id"] == b_id
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for series in (f'cliper_bundle_loads_total{{bundle="{b_id}",result="loaded"}} 2.0',
                       'result="refused"', f'cliper_compute_ms_count{{bundle="{a_id}"',
                       f'cliper_queue_ms_count{{bundle="{b_id}",endpoint="/topk"}}'):
            assert series in metrics
    finally:
        stop_process(proc, signal.SIGTERM)
    text = (tmp_path / "serve.log").read_text()
    assert text.count("new bundle refused") == 2  # once per worker
    assert "Traceback" not in text


class RecordedMetrics(ServiceMetrics):
    """The service's metrics, kept in a list."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        super().__init__()

    def make(self, metric) -> None:
        return None

    def add(self, metric, value: float, labels: dict[str, str]) -> None:
        self.calls.append((metric.name, labels))


def test_swaps_refuse_a_dangling_link_or_a_broken_bundle_once_and_keep_the_old_one(
        exported, tmp_path: Path) -> None:
    """Swap rules in one process: nothing changes while the link does not; a link to nothing
    and a broken bundle are each refused once (logged, counted), the old bundle serving; a
    good bundle swaps in, and a request holding the old one still ranks on it."""
    b = second_bundle(exported["bundle"], tmp_path / "b")
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    (broken / "topk.onnx").write_bytes(b"not a graph")
    link = tmp_path / "current"
    os.symlink(exported["bundle"], link)
    metrics = RecordedMetrics()
    service = Service(ServeSettings(bundle=str(link), reload_poll_s=0), metrics, batch,
                      engine={"name": "test"}, replica="test")
    old = service.live
    users = (exported["bundle"] / "user_ids.txt").read_text().split()[:4]
    a_id, a_answers = expected_answers(exported["bundle"], users, 5)
    b_id, _ = expected_answers(b, users, 5)
    assert old.id == a_id and not service.swap_if_changed()
    for target in (tmp_path / "missing", broken):
        switch(link, target)
        assert not service.swap_if_changed() and not service.swap_if_changed()
        assert service.live is old
    refused = [labels["bundle"] for name, labels in metrics.calls
               if name == "cliper_bundle_loads" and labels["result"] == "refused"]
    assert refused == ["unreadable", _manifest_hash(broken)[:12]]
    switch(link, b)
    assert service.swap_if_changed() and service.live.id == b_id
    rows, _ = old.ranker.prepare(users, 5)
    assert old.ranker.answer(users, old.ranker.rank(rows), 5, set()) == \
        [a_answers[u] for u in users]


def _manifest_hash(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
