"""GPU placement on Ray, checked without a GPU: what Ray is asked for, and no silent CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import cliper_prod.runtime.bundle_reader as runtime_bundle
import cliper_prod.serving.ray_engine as serving
from cliper_prod.commands import cli
from cliper_prod.errors import ConfigError, RuntimeSetupError
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.embed_ray import RaySettings


def test_the_deployment_asks_ray_for_each_replicas_gpus() -> None:
    settings = serving.ServeSettings(bundle="b", gpus_per_replica=0.5)
    deployment = serving.service_deployment(settings, replicas=3)
    assert deployment.ray_actor_options["num_gpus"] == 0.5 and deployment.num_replicas == 3
    cpu_only = serving.service_deployment(serving.ServeSettings(bundle="b"), replicas=1)
    assert cpu_only.ray_actor_options["num_gpus"] == 0


def deployed_settings(monkeypatch, exported: dict, *options: str) -> serving.ServeSettings:
    """The settings `cliper-prod serve` would deploy with (start_service stopped short)."""
    seen = {}

    def stop_short(settings, **_):
        seen["settings"] = settings
        raise ConfigError("stopped before deploying")
    monkeypatch.setattr(serving, "connect", lambda address=None, metrics_port=None: None)
    monkeypatch.setattr(serving, "start_service", stop_short)
    res = CliRunner().invoke(cli, ["serve", "--engine", "ray", "--bundle",
                                   str(exported["bundle"]), *options])
    assert "stopped before deploying" in res.stderr, res.output
    return seen["settings"]


def test_serve_gives_replicas_a_gpu_with_cuda_only(monkeypatch, exported: dict) -> None:
    assert deployed_settings(monkeypatch, exported, "--device", "cpu").gpus_per_replica == 0
    assert deployed_settings(monkeypatch, exported, "--gpus-per-replica",
                             "0.25").gpus_per_replica == 0.25
    monkeypatch.setattr(runtime_bundle, "choose_providers",
                        lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert deployed_settings(monkeypatch, exported, "--device", "cuda").gpus_per_replica == 1


def test_serve_cuda_without_a_cuda_runtime_exits_9(exported: dict) -> None:
    res = CliRunner().invoke(cli, ["serve", "--bundle", str(exported["bundle"]),
                                   "--provider", "cuda"])
    assert res.exit_code == 9 and "error: --provider cuda" in res.stderr, res.output


def test_a_session_that_fell_back_to_the_cpu_is_refused_under_cuda(monkeypatch,
                                                                   exported: dict) -> None:
    """The CPU onnxruntime here, asked for the CUDA provider, runs on the CPU: ONNX Runtime's
    silent fallback, as on a GPU host whose process sees no GPU."""
    monkeypatch.setattr(runtime_bundle, "choose_providers",
                        lambda device: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    Bundle(exported["bundle"], "auto").graph("topk")  # auto may fall back
    with pytest.raises(RuntimeSetupError, match="runs topk on CPUExecutionProvider") as info:
        Bundle(exported["bundle"], "cuda").graph("topk")
    assert info.value.exit_code == 9
    users = exported["root"] / "users.txt"
    users.write_text((exported["bundle"] / "user_ids.txt").read_text().split()[0] + "\n")
    res = CliRunner().invoke(cli, ["topk", "--users", str(users), "--bundle",
                                   str(exported["bundle"]), "--device", "cuda"])
    assert res.exit_code == 9 and "sees no GPU" in res.stderr, res.output


def test_replicas_asking_for_missing_gpus_fail_at_once(monkeypatch) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(RuntimeSetupError, match="ask for 2 GPU.*has 0"):
        serving._check_gpus(2.0)
    serving._check_gpus(0.0)


@pytest.mark.parametrize("asked, cluster, expected", [(None, 0, 0), (None, 4, 1), (0.5, 4, 0.5),
                                                      (0, 4, 0)])
def test_embed_ray_actors_ask_for_their_gpus(asked, cluster, expected) -> None:
    assert RaySettings(gpus_per_actor=asked).actor_gpus(cluster) == expected


def test_gpus_per_actor_goes_with_ray(exported: dict, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["embed", str(exported["policy_items"]), "--bundle",
                                   str(exported["bundle"]), "--out", str(tmp_path / "o"),
                                   "--gpus-per-actor", "1"])
    assert res.exit_code == 2 and "go with --ray" in res.stderr
