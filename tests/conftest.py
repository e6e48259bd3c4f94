"""Shared fixtures: tiny MMRec-format folders written by hand, one exported bundle, and that
bundle served on loopback by each engine (with the HTTP helpers the serving tests share)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner

from cliper_prod.config import load_config


def write_inter(folder: Path, rows: list[tuple], header: str = "userID\titemID\tx_label",
                name: str = "toy") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.inter"
    lines = [header] + ["\t".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toy_rows(n_users: int = 30, n_items: int = 20, per_user: int = 8, seed: int = 0) -> list[tuple]:
    """Random interactions, every item in train, >= 1 valid and test row per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        labels = [0] * (per_user - 2) + [1, 2]
        rows += [(u, int(i), lab) for i, lab in zip(items, labels)]
    seen = {(i) for u, i, lab in rows if lab == 0}
    rows += [(0, i, 0) for i in range(n_items) if i not in seen and (0, i) not in
             {(u, it) for u, it, _ in rows}]
    return rows


def rewrite_manifest(folder: Path, manifest: dict) -> None:
    """Write ``manifest`` into ``folder`` with the self-hash a bundle of format 3 carries,
    computed here as the format defines it (sha256 of the sorted, space-free UTF-8 JSON
    without the field): a test's edit that must get past the manifest's own check."""
    import hashlib

    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    manifest = {**content, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def served_manifest(bundle: Path) -> dict:
    """The manifest as /metadata shows it: the CLIP checkpoint named by its folder's name."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("features") and Path(manifest["features"]["clip"]).is_absolute():
        manifest["features"]["clip"] = Path(manifest["features"]["clip"]).name
    return manifest


def widened(record: dict) -> dict:
    """A `topk` output line with its scores (float32 in their shortest decimal form) widened
    to float64 as the Python and HTTP APIs give them: equal exactly when the float32 values are."""
    return {**record, "scores": [float(np.float32(s)) for s in record["scores"]]}


def ranked_as_naive_numpy(bundle: Path, records: list[dict], k: int = 10) -> int:
    """Assert that ``records`` (the rankings of ``bundle``'s users, in order) equal naive numpy
    over the bundle's tables, each user's training items excluded; how many of the ranked items
    were added ones (ids starting with NEW)."""
    users = np.load(bundle / "user_embeddings.npy").astype(np.float64)
    items = np.load(bundle / "item_embeddings.npy").astype(np.float64)
    item_ids = np.array((bundle / "item_ids.txt").read_text().splitlines())
    indptr, history = (np.load(bundle / f"history_{n}.npy") for n in ("indptr", "items"))
    new_ranked = 0
    for u, record in enumerate(records):
        scores = users[u] @ items.T
        scores[history[indptr[u]:indptr[u + 1]]] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        np.testing.assert_allclose(record["scores"], scores[order], rtol=1e-5, atol=1e-6)
        assert record["items"] == item_ids[order].tolist()
        new_ranked += sum(i.startswith("NEW") for i in record["items"])
    return new_ranked


def model_config(backbone: str, **model) -> dict:
    """The packaged [model] defaults of ``backbone`` with ``model``'s keys changed."""
    return {**load_config(backbone)["model"], **model}


@pytest.fixture
def toy_dataset(tmp_path: Path) -> Path:
    """A 30-user, 20-item folder with 16-d image and 8-d text features."""
    folder = tmp_path / "toy"
    write_inter(folder, toy_rows())
    rng = np.random.default_rng(1)
    np.save(folder / "image_feat.npy", rng.standard_normal((20, 16)).astype(np.float32))
    np.save(folder / "text_feat.npy", rng.standard_normal((20, 8)).astype(np.float32))
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Synthetic catalog -> tiny random CLIP -> embed (PyTorch) -> FREEDOM -> bundle."""
    from cliper_prod.commands import cli
    from cliper_prod.data.mmrec import load_dataset
    from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
    from cliper_prod.features.clip_towers import ClipTowers
    from cliper_prod.features.embed import embed_catalog
    from cliper_prod.features.tiny_clip import build_tiny_clip
    from cliper_prod.pipeline import catalog_texts
    from cliper_prod.training import train_model

    root = tmp_path_factory.mktemp("export")
    catalog = root / "catalog"
    generate_catalog(catalog, SyntheticSpec(n_users=80, n_items=60, seed=3))
    # a few items that exercise every per-item policy of embed
    extra = catalog / "items_policy.jsonl"
    lines = (catalog / "items.jsonl").read_text().splitlines()[:6]
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "images/none.png"})
    lines[2] = json.dumps({"item_id": "T1", "image": json.loads(lines[2])["image"]})
    lines += ["{not json", json.dumps({"item_id": "T2"}),
              json.dumps({"item_id": "T3", "title": "word " * 300})]
    extra.write_text("\n".join(lines) + "\n")
    clip = build_tiny_clip(root / "clip", catalog_texts(catalog) + ["word"])
    embed_catalog(catalog / "items.jsonl", ClipTowers(clip), catalog / "cliper", progress=False)
    config = load_config("freedom", overrides={"train": {"epochs": 2}})
    data = load_dataset(catalog, features_dir=catalog / "cliper")
    train_model("freedom", data, config, root / "ckpt", progress=False)
    res = CliRunner().invoke(cli, ["export", "--checkpoint", str(root / "ckpt"), "--out",
                                   str(root / "bundle"), "--max-k", "50", "--chunk-items", "16"])
    assert res.exit_code == 0, res.output
    return {"root": root, "catalog": catalog, "clip": clip, "ckpt": root / "ckpt",
            "bundle": root / "bundle", "policy_items": extra}


def call(url: str, path: str, body: object = None, raw: bytes | None = None,
         method: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """One HTTP request to a service: its status and decoded JSON answer."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def bundle_users(exported) -> list[str]:
    return (exported["bundle"] / "user_ids.txt").read_text().split()


def scrape(url: str, prefix: str = "cliper_") -> dict[tuple, float]:
    """Prometheus text -> {(metric, endpoint or action, status, le): value} of the series named
    ``prefix``..., summed over their other labels (Ray's replica tags, say)."""
    out: dict[tuple, float] = {}
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if not line.startswith(prefix):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            key = (name, labels.get("endpoint") or labels.get("action"), labels.get("status"),
                   labels.get("le"))
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


READ_TIMEOUT_S = 2.0  # the shared service's --read-timeout-s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 180.0
                 ) -> dict | None:
    """``url``'s /healthz answer once it is a 200; None if ``proc`` exited or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
                return json.loads(resp.read())
        except OSError:  # not listening yet, or a 503
            time.sleep(1)
    return None


def stop_process(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` and wait for the exit (killed after 120 s)."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def local_ray():
    """One Ray per session (Serve takes tens of seconds to start): the service's replica (1 CPU)
    beside the stages of `embed --ray` (1 + 0.5 + 0.25)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def image_root(exported, tmp_path_factory) -> Path:
    """The catalog's images copied into a root of their own, with a symbolic link loop."""
    root = tmp_path_factory.mktemp("image_root")
    shutil.copytree(exported["catalog"] / "images", root / "images")
    (root / "loop.png").symlink_to("loop.png")
    return root


@pytest.fixture(scope="session")
def service(local_ray, exported, image_root) -> str:
    """The bundle served on loopback (a free port); its URL."""
    from ray import serve

    from cliper_prod.serving.ray_engine import ServeSettings, start_service

    port = free_port()
    settings = ServeSettings(bundle=str(exported["bundle"]), image_root=str(image_root),
                             max_request_bytes=1 << 20, max_users=100, max_items=64,
                             read_timeout_s=READ_TIMEOUT_S)
    url = start_service(settings, port=port)
    wait_healthy(url, timeout_s=120)
    yield url
    serve.shutdown()


LOCAL_BATCH_WAIT_MS = 20  # the local service's /topk batching wait: concurrent requests merge


def serve_local(exported, image_root, cwd: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """`cliper-prod serve --engine local` on a free loopback port, as a user starts it, with
    the body-size and read-time limits of the Ray `service` above; its URL and process once
    healthy (its stderr in ``cwd``/serve.log)."""
    import os
    import sys

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "cliper-prod"), "serve", "--engine", "local",
           "--bundle", str(exported["bundle"]), "--port", str(port), "--device", "cpu",
           "--image-root", str(image_root), "--max-request-bytes", str(1 << 20),
           "--read-timeout-s", str(READ_TIMEOUT_S), "--batch-wait-ms", str(LOCAL_BATCH_WAIT_MS),
           *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with (cwd / "serve.log").open("w") as log:  # a file: a full pipe would block the server
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    if wait_healthy(url, proc, timeout_s=120) != {"status": "ok"}:
        stop_process(proc, 9)
        raise RuntimeError(f"the local engine did not start: "
                           f"{(cwd / 'serve.log').read_text()[-2000:]}")
    return url, proc


@pytest.fixture(scope="session")
def local_service(exported, image_root, tmp_path_factory) -> str:
    """The bundle served by the local engine (two workers, no Ray) on loopback; its URL."""
    import signal

    url, proc = serve_local(exported, image_root, tmp_path_factory.mktemp("local"),
                            "--workers", "2")
    yield url
    stop_process(proc, signal.SIGTERM)


def interrupt_embed_after(monkeypatch, shards: int) -> Callable[[], None]:
    """Make the next embed stop as Ctrl-C stops it once it has written ``shards`` shards;
    call the returned function to have shards written normally again."""
    from cliper_prod.features.shards import ShardStore

    write = ShardStore.write

    def write_then_die(self, shard) -> None:
        write(self, shard)
        if self.count == shards:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardStore, "write", write_then_die)
    return lambda: monkeypatch.setattr(ShardStore, "write", write)
