"""``cliper-prod serve``: a bundle over HTTP, on this machine's uvicorn workers (``--engine
local``, the default) or on Ray Serve (``--engine ray``, for clusters); stopped cleanly by
Ctrl-C/SIGTERM."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cliper_prod.commands.common import (DEFAULT_BUNDLE, given_options, inter_op_threads_option,
                                         precision_option, provider_option)
from cliper_prod.errors import ConfigError

if TYPE_CHECKING:
    from cliper_prod.serving.service import ServeSettings

ENGINES = ("local", "ray")
#: each engine's default --batch-wait-ms: the local batcher has no proxy hop to hide a wait in
BATCH_WAIT_MS = {"local": 0.0, "ray": 2.0}
#: the options that only one engine has, as the command's parameter names
ENGINE_ONLY = {"local": ("workers",),
               "ray": ("replicas", "address", "gpus_per_replica", "metrics_port", "print_config")}


@click.command("serve")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), metavar="DIR",
              default=DEFAULT_BUNDLE, show_default=True,
              help="Bundle folder written by `cliper-prod export`.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="local: uvicorn worker processes on this machine, without Ray; ray: Ray "
                   "Serve (a local Ray, or the cluster at --address).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="[local] Worker processes; each loads the bundle's sessions.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="[ray] Replicas of the deployment.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Port to listen on.")
@click.option("--address", help="[ray] Ray cluster to deploy on (default: start a local Ray).")
@provider_option()
@click.option("--image-root", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Folder that /embed image paths resolve under (default: paths refused, "
                   "base64 images only).")
@click.option("--no-batching", is_flag=True, help="Run each /topk request alone.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="/topk requests merged into one ONNX run.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0),
              help="How long the first /topk request of a batch waits for others [default: 0 "
                   "with --engine local: a batch is what queued while the previous run ran, so "
                   "a lone request never waits; 2 with --engine ray].")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 << 20,
              show_default=True, help="Larger request bodies get a 413.")
@click.option("--gpus-per-replica", type=click.FloatRange(min=0),
              help="[ray] GPUs Ray gives each replica (fractions share one) [default: 1 with "
                   "--provider cuda, else 0; Ray hides GPUs from a replica that asks for none].")
@click.option("--read-timeout-s", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True,
              help="Time to receive a request's body; a slower client gets a 408.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="[ray] Port of the local Ray's Prometheus endpoint (/metrics), where the "
                   "application metrics are read [default: a free port]; a cluster's nodes "
                   "export on their own. The local engine answers /metrics on --port.")
@click.option("--print-config", is_flag=True,
              help="[ray] Print the Ray Serve config file (YAML) equivalent to these options, "
                   "for `serve run` / `serve deploy`, and exit without serving.")
@click.option("--reload-poll-s", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How often each worker or replica looks for a new bundle at --bundle (a "
                   "link switched to a new folder) and swaps it in; 0: never.")
@precision_option("CLIP graphs /embed runs.")
@click.option("--intra-op-threads", type=click.IntRange(min=0),
              help="ONNX Runtime threads per operator in each worker (replica) [default: the "
                   "CPUs // --workers with several local workers, else ORT's own: every core; "
                   "0: ORT's own].")
@inter_op_threads_option("in each worker")
@click.option("--startup-timeout-s", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True,
              help="Time for the workers (local) or Ray Serve's proxy and the replicas (ray) to "
                   "start (exit code 9 past it); raise it on a busy machine.")
def command(bundle_dir: Path, engine: str, workers: int, replicas: int, host: str, port: int,
            address: str | None, provider: str, image_root: Path | None, no_batching: bool,
            max_batch_size: int, batch_wait_ms: float | None, max_request_bytes: int,
            gpus_per_replica: float | None, read_timeout_s: float, metrics_port: int | None,
            print_config: bool, reload_poll_s: float, precision: str,
            intra_op_threads: int | None, inter_op_threads: int, startup_timeout_s: float) -> None:
    """Serve a bundle over HTTP: POST /topk, POST /similar, POST /embed, GET /healthz,
    GET /metadata (OpenAPI schema at /openapi.json; GET /metrics with --engine local). Stops
    cleanly on Ctrl-C or SIGTERM, draining the requests in flight; swaps in a new bundle found
    at --bundle (see --reload-poll-s)."""
    _refuse_other_engines_options(click.get_current_context(), engine)
    from cliper_prod.runtime.bundle_reader import Bundle
    from cliper_prod.serving.service import ServeSettings

    from cliper_prod.runtime.sessions import cores_per_worker

    # a broken bundle, or one without the --precision asked for, fails here, with its exit code
    Bundle(bundle_dir, provider).check_precision(precision)
    if intra_op_threads is None:
        intra_op_threads = cores_per_worker(workers) if engine == "local" else 0
    if image_root is not None and not image_root.is_dir():
        raise ConfigError(f"--image-root {image_root}: not a folder")
    if engine == "ray" and gpus_per_replica is None:
        gpus_per_replica = 1.0 if provider == "cuda" else 0.0
    if batch_wait_ms is None:
        batch_wait_ms = BATCH_WAIT_MS[engine]
    # absolute, not resolved: a link at --bundle is followed anew when it switches
    settings = ServeSettings(bundle=str(bundle_dir.absolute()), provider=provider,
                             image_root=str(image_root.resolve()) if image_root else None,
                             batching=not no_batching, max_batch_size=max_batch_size,
                             batch_wait_timeout_s=batch_wait_ms / 1000,
                             max_request_bytes=max_request_bytes,
                             read_timeout_s=read_timeout_s,
                             gpus_per_replica=gpus_per_replica or 0.0,
                             reload_poll_s=reload_poll_s, precision=precision,
                             intra_op_threads=intra_op_threads,
                             inter_op_threads=inter_op_threads)
    if engine == "local":
        _serve_locally(settings, bundle_dir, workers=workers, host=host, port=port,
                       startup_timeout_s=startup_timeout_s)
    elif print_config:
        _print_ray_config(settings, replicas=replicas, host=host, port=port)
    else:
        _serve_on_ray(settings, bundle_dir, replicas=replicas, host=host, port=port,
                      address=address, metrics_port=metrics_port,
                      startup_timeout_s=startup_timeout_s)


def _refuse_other_engines_options(ctx: click.Context, engine: str) -> None:
    """An option of the other engine, given, would be silently ignored: refuse it (exit 2)."""
    given = given_options(ctx, [name for other, names in ENGINE_ONLY.items() if other != engine
                                for name in names])
    if given:
        other = next(e for e in ENGINES if e != engine)
        raise ConfigError(f"{', '.join(given)}: only with --engine {other} (this is "
                          f"--engine {engine})")


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: from here on, a signal drains and stops."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _sessions(providers: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} on {chain[0]}" for name, chain in providers.items())


def _serve_locally(settings: ServeSettings, bundle_dir: Path, *, workers: int, host: str, port: int,
                   startup_timeout_s: float) -> None:
    try:
        from cliper_prod.serving.local_engine import LocalServer
    except ImportError as exc:
        raise ConfigError(f"serve needs FastAPI and uvicorn ({exc.name} missing): pip install "
                          f"'cliper-prod[serve]'") from None
    stop = _stop_on_signals()
    server = LocalServer(settings, workers=workers, host=host, port=port)
    try:
        providers = server.start(startup_timeout_s)
        click.echo(f"serving {bundle_dir} at {server.url} (local engine, {workers} worker(s); "
                   f"{_sessions(providers)}); API schema at {server.url}/docs, metrics at "
                   f"{server.url}/metrics; Ctrl-C stops", err=True)
        while not stop.wait(1.0):
            server.replace_dead()
        click.echo("draining in-flight requests and stopping", err=True)
    finally:
        server.stop()


def _ray_engine():
    """The Ray engine's module, or why it cannot be had."""
    try:
        import cliper_prod.serving.ray_engine as ray_engine
    except ImportError as exc:
        raise ConfigError(f"serve --engine ray needs Ray Serve ({exc.name} missing): pip "
                          f"install 'cliper-prod[ray]'") from None
    return ray_engine


def _print_ray_config(settings: ServeSettings, *, replicas: int, host: str, port: int) -> None:
    import yaml

    config = _ray_engine().serve_config(settings, replicas=replicas, host=host, port=port)
    click.echo(yaml.safe_dump(config, sort_keys=False), nl=False)


def _serve_on_ray(settings: ServeSettings, bundle_dir: Path, *, replicas: int, host: str, port: int,
                  address: str | None, metrics_port: int | None,
                  startup_timeout_s: float) -> None:
    ray_engine = _ray_engine()
    ray_engine.connect(address, metrics_port)
    stop = _stop_on_signals()  # after ray.init, which installs its own handlers
    url = ray_engine.start_service(settings, replicas=replicas, host=host, port=port,
                                   address=address, startup_timeout_s=startup_timeout_s)
    click.echo(f"serving {bundle_dir} at {url} (Ray engine, {replicas} replica(s), "
               f"{settings.gpus_per_replica:g} GPU each; "
               f"{_sessions(ray_engine.live_providers())}); API schema at {url}/docs; "
               f"Ctrl-C stops", err=True)
    stop.wait()
    click.echo("draining in-flight requests and stopping", err=True)
    ray_engine.stop_service()
