"""`cliper-prod serve --engine ray` as a user starts it: one command, answers, and stops
cleanly on SIGTERM (the local engine's twins are in tests/test_serve_local.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, scrape, stop_process, wait_healthy


def test_serve_starts_with_one_command_and_drains_on_sigterm(exported, tmp_path) -> None:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "cliper-prod"), "serve", "--engine", "ray",
           "--bundle", str(exported["bundle"]), "--port", str(port)]
    env = {**os.environ, "RAY_ADDRESS": ""}  # a Ray of its own, as on a fresh machine
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert health == {"status": "ok"}, proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"at http://127.0.0.1:{port}" in err and "draining in-flight requests" in err


def test_print_config_round_trips_through_the_serve_builder(exported) -> None:
    import yaml
    from click.testing import CliRunner

    from cliper_prod.commands import cli
    from cliper_prod.serving.ray_engine import ServeSettings, build

    res = CliRunner().invoke(cli, ["serve", "--engine", "ray", "--bundle", str(exported["bundle"]),
                                   "--port", "8123", "--replicas", "3", "--max-batch-size", "16",
                                   "--print-config"])
    assert res.exit_code == 0, res.output
    config = yaml.safe_load(res.stdout)
    app = config["applications"][0]
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert app["import_path"] == "cliper_prod.serving.ray_engine:build"
    assert app["deployments"][0]["num_replicas"] == 3
    assert ServeSettings(**app["args"]).max_batch_size == 16
    assert build(app["args"]) is not None
    with pytest.raises(ValueError, match="max_batch"):
        build({**app["args"], "max_batch": 1})
    # `serve run ... key=value` passes strings: converted as Ray's pydantic validation does
    old_names = {k: v for k, v in app["args"].items() if k != "provider"}
    as_strings = ServeSettings.model_validate({**old_names, "max_batch_size": "8",
                                               "batching": "false", "device": "cpu"})
    assert (as_strings.max_batch_size, as_strings.batching, as_strings.provider) == (8, False,
                                                                                      "cpu")
    with pytest.raises(ValueError, match="provider"):
        ServeSettings.model_validate({**app["args"], "provider": "tpu"})


def test_serve_build_writes_a_config_of_the_bound_application(exported, tmp_path) -> None:
    """Ray's `serve build` takes a built application, never a builder: ``application`` is the
    deployment bound to the settings in CLIPER_SERVE_ARGS; without them, one line says so."""
    import yaml

    serve = str(Path(sys.executable).parent / "serve")
    target = "cliper_prod.serving.ray_engine:application"
    env = {**os.environ, "CLIPER_SERVE_ARGS": json.dumps({"bundle": str(exported["bundle"]),
                                                          "max_batch_size": 8})}
    proc = subprocess.run([serve, "build", target, "-o", str(tmp_path / "serve.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    app = yaml.safe_load((tmp_path / "serve.yaml").read_text())["applications"][0]
    assert app["import_path"] == target
    assert app["deployments"][0]["name"] == "CliperService"
    env.pop("CLIPER_SERVE_ARGS")
    proc = subprocess.run([serve, "build", target], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "CLIPER_SERVE_ARGS is not set" in proc.stderr


def test_serve_run_of_the_example_config_answers_topk(exported, tmp_path) -> None:
    """Ray Serve's own `serve run` of the packaged example config (autoscaling 1-2 replicas),
    answering as the Python API does."""
    import yaml

    import cliper_prod.serving.ray_engine as serving
    from cliper_prod.runtime.recommender import Recommender

    config = yaml.safe_load((Path(serving.__file__).parent / "serve_config.example.yaml")
                            .read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(bundle=str(exported["bundle"]), device="cpu")
    app["deployments"][0]["autoscaling_config"]["max_replicas"] = 2
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] = "120"  # a busy 2-core machine
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "--address",
                             "local", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    users = (exported["bundle"] / "user_ids.txt").read_text().split()[:5]
    try:
        assert wait_healthy(url, proc), proc.stderr.read()[-2000:]
        req = urllib.request.Request(url + "/topk", json.dumps({"users": users, "k": 5}).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())["results"]
        with urllib.request.urlopen(url + "/metadata", timeout=60) as r:
            settings = json.loads(r.read())["settings"]
    finally:
        stop_process(proc, signal.SIGINT)
    assert answer == Recommender(exported["bundle"], provider="cpu").topk(users, k=5)
    # /metadata names the bundle folder, never the server's path to it
    assert settings["bundle"] == exported["bundle"].name and settings["max_batch_size"] == 64


def test_application_metrics_are_scraped_from_the_prometheus_endpoint(exported, tmp_path
                                                                      ) -> None:
    port, metrics_port = free_port(), free_port()
    cmd = [str(Path(sys.executable).parent / "cliper-prod"), "serve", "--engine", "ray",
           "--bundle", str(exported["bundle"]), "--port", str(port), "--metrics-port",
           str(metrics_port), "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    users = (exported["bundle"] / "user_ids.txt").read_text().split()

    def post(path: str, body: dict) -> int:
        req = urllib.request.Request(url + path, json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        assert wait_healthy(url, proc), proc.stderr.read()[-2000:]
        statuses = [post("/topk", {"users": [u], "k": 5}) for u in users[:3]]
        statuses.append(post("/topk", {"users": ["nobody"], "k": 5}))
        statuses.append(post("/embed", {"items": [{"item_id": "new-1", "title": "A blanket"},
                                                  {"item_id": "new-2", "image": "x.jpg"}]}))
        assert statuses == [200, 200, 200, 400, 200]
        expected = {("ray_cliper_requests_total", "/topk", "200", None): 3.0,
                    ("ray_cliper_requests_total", "/topk", "400", None): 1.0,
                    ("ray_cliper_requests_total", "/embed", "200", None): 1.0,
                    ("ray_cliper_items_embedded_total", None, None, None): 1.0,
                    ("ray_cliper_item_errors_total", "skipped", None, None): 1.0,  # no image, text
                    ("ray_cliper_item_errors_total", "kept", None, None): 1.0,  # no image
                    ("ray_cliper_request_latency_ms_count", "/topk", None, None): 4.0,
                    ("ray_cliper_topk_batch_requests_count", None, None, None): 3.0}
        deadline, seen = time.monotonic() + 90, {}
        while time.monotonic() < deadline:  # Ray's agent exports every few seconds
            seen = scrape(f"http://127.0.0.1:{metrics_port}/metrics", "ray_cliper_")
            if all(seen.get(k) == v for k, v in expected.items()):
                break
            time.sleep(2)
    finally:
        stop_process(proc, signal.SIGTERM)
    assert {k: seen.get(k) for k in expected} == expected
    # three lone requests: each merged batch held one
    assert seen[("ray_cliper_topk_batch_requests_bucket", None, None, "1.0")] == 3.0
