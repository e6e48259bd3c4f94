"""``cliper-prod serve``: a bundle over HTTP on Ray Serve, stopped cleanly by Ctrl-C/SIGTERM."""

from __future__ import annotations

from pathlib import Path

import click

from cliper_prod.commands.common import DEFAULT_BUNDLE, device_option
from cliper_prod.errors import ConfigError


@click.command("serve")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=DEFAULT_BUNDLE, show_default=True,
              help="Bundle folder written by `cliper-prod export`.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--address", help="Ray cluster to deploy on (default: start a local Ray).")
@device_option()
@click.option("--image-root", type=click.Path(path_type=Path, file_okay=False),
              help="Folder that /embed image paths resolve under (default: paths refused, "
                   "base64 images only).")
@click.option("--no-batching", is_flag=True, help="Run each /topk request alone.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="/topk requests merged into one ONNX run.")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="How long a /topk request waits for others to batch with.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=16 << 20,
              show_default=True)
@click.option("--gpus-per-replica", type=click.FloatRange(min=0),
              help="GPUs Ray gives each replica (fractions share one) [default: 1 with "
                   "--device cuda, else 0; Ray hides GPUs from a replica that asks for none].")
@click.option("--read-timeout-s", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True,
              help="Time to receive a request's body; a slower client gets a 408.")
@click.option("--metrics-port", type=click.IntRange(1, 65535),
              help="Port of the local Ray's Prometheus endpoint (/metrics), where the "
                   "application metrics are read [default: a free port]; a cluster's nodes "
                   "export on their own.")
@click.option("--print-config", is_flag=True,
              help="Print the Ray Serve config file (YAML) equivalent to these options, for "
                   "`serve run` / `serve deploy`, and exit without serving.")
@click.option("--startup-timeout-s", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True,
              help="Time for Ray Serve's proxy and the replicas to start (exit code 9 past it); "
                   "raise it on a busy machine.")
def command(bundle_dir: Path, replicas: int, host: str, port: int, address: str | None,
            device: str, image_root: Path | None, no_batching: bool, max_batch_size: int,
            batch_wait_ms: float, max_request_bytes: int, gpus_per_replica: float | None,
            read_timeout_s: float, metrics_port: int | None, print_config: bool,
            startup_timeout_s: float) -> None:
    """Serve a bundle over HTTP on Ray Serve: POST /topk, POST /embed, GET /healthz,
    GET /metadata (OpenAPI schema at /openapi.json). Stops cleanly on Ctrl-C or SIGTERM."""
    import signal
    import threading

    from cliper_prod.runtime.bundle import Bundle

    Bundle(bundle_dir, device)  # a broken bundle fails here, with its exit code
    if image_root is not None and not image_root.is_dir():
        raise ConfigError(f"--image-root {image_root}: not a folder")
    try:
        from cliper_prod.serving.app import (ServeSettings, connect, live_providers,
                                             start_service, stop_service)
    except ImportError as exc:
        raise ConfigError(f"serve needs Ray Serve ({exc.name} missing): pip install "
                          f"'cliper-prod[ray]'") from None
    settings = ServeSettings(bundle=str(bundle_dir.resolve()), device=device,
                             image_root=str(image_root.resolve()) if image_root else None,
                             batching=not no_batching, max_batch_size=max_batch_size,
                             batch_wait_timeout_s=batch_wait_ms / 1000,
                             max_request_bytes=max_request_bytes,
                             read_timeout_s=read_timeout_s,
                             gpus_per_replica=(1.0 if device == "cuda" else 0.0)
                             if gpus_per_replica is None else gpus_per_replica)
    if print_config:
        import yaml

        from cliper_prod.serving.app import serve_config

        click.echo(yaml.safe_dump(serve_config(settings, replicas=replicas, host=host,
                                               port=port), sort_keys=False), nl=False)
        return
    connect(address, metrics_port)
    stop = threading.Event()  # a signal from here on drains and stops, even during start-up
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    url = start_service(settings, replicas=replicas, host=host, port=port, address=address,
                        startup_timeout_s=startup_timeout_s)
    sessions = ", ".join(f"{name} on {providers[0]}"
                         for name, providers in live_providers().items())
    click.echo(f"serving {bundle_dir} at {url} ({replicas} replica(s), "
               f"{settings.gpus_per_replica:g} GPU each; {sessions}); API schema at {url}/docs; "
               f"Ctrl-C stops", err=True)
    stop.wait()
    click.echo("draining in-flight requests and stopping", err=True)
    stop_service()
