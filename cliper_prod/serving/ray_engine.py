"""``cliper-prod serve --engine ray``: the HTTP API (:mod:`cliper_prod.serving.api`) on Ray
Serve, as a deployment of replicas behind Ray Serve's proxy, on a laptop or a Ray cluster.

Each replica loads a :class:`~cliper_prod.serving.service.Service` with Ray Serve's metrics and
``serve.batch`` (concurrent /topk requests merged into one ONNX run); Serve's periodic
``check_health`` runs the readiness probe, so a replica whose session broke is replaced.
:func:`build` is the application builder of Serve config files (``import_path:
cliper_prod.serving.ray_engine:build``; the older ``cliper_prod.serving.app:build`` still works).
``serve build`` takes a built application, never a builder: ``application`` is the deployment
bound to the settings in the environment variable :data:`SETTINGS_ENV` (a JSON object).
"""

import logging
import os
import time
from pathlib import Path

from ray import serve
from ray.serve.api import RunTarget
from ray.serve.deployment import Application
from ray.serve.schema import ApplicationStatus

from cliper_prod.errors import RuntimeSetupError
from cliper_prod.messages import first_line, shorten
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.serving.api import create_app
from cliper_prod.serving.metrics import RayMetrics
from cliper_prod.serving.service import ServeSettings, Service

logger = logging.getLogger(__name__)
APP_NAME = "cliper"


def replica_service() -> Service:
    """The service of the replica answering. Ray serves a copy of the app that serve.ingress
    froze, so the app reaches it through the replica's deployment instance."""
    return serve.get_replica_context().servable_object.service


app = create_app(replica_service)


@serve.deployment(graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=1)
@serve.ingress(app)
class CliperService:
    def __init__(self, settings: ServeSettings) -> None:
        self.service = Service(
            settings, RayMetrics(), serve.batch, engine={"name": "ray"},
            replica=serve.get_replica_context().replica_id.unique_id)

    def live_providers(self) -> dict[str, list[str]]:
        """The execution providers of this replica's sessions."""
        return self.service.providers

    def check_health(self) -> None:
        """Ray Serve's periodic replica check: the readiness probe; raising makes Serve replace
        the replica."""
        self.service.live.readiness.check()


def connect(address: str | None = None, metrics_port: int | None = None) -> None:
    """Join ``address``, or start a local Ray (its Prometheus endpoint on ``metrics_port``,
    default a free port), unless this process is already connected."""
    import ray

    if not ray.is_initialized():
        local = {"_metrics_export_port": metrics_port} if address is None and metrics_port else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)


def service_deployment(settings: ServeSettings, replicas: int | None = None
                       ) -> serve.Deployment:
    """The deployment as Ray receives it: its request cap, GPUs and (unless a config file's
    ``deployments`` section or autoscaling decides) replicas."""
    options = _deployment_options(settings)
    if replicas is not None:
        options["num_replicas"] = replicas
    return CliperService.options(**options)


def _deployment_options(settings: ServeSettings) -> dict:
    """What the settings fix of the deployment, in code or in a config file's ``deployments``."""
    return {"max_ongoing_requests": settings.max_ongoing_requests,
            "ray_actor_options": {"num_gpus": settings.gpus_per_replica}}


BUILDER = "cliper_prod.serving.ray_engine:build"  # the import_path of a Serve config file


def build(args: ServeSettings) -> Application:
    """Ray Serve's application builder: ``serve run config.yaml`` and ``serve deploy`` call it
    with the config's ``args``, which Ray validates as :class:`ServeSettings` (a plain dict is
    validated here). Replicas, autoscaling and GPUs come from the config's ``deployments``
    section (see ``cliper_prod/serving/serve_config.example.yaml``); a bad bundle fails the
    build."""
    settings = ServeSettings.model_validate(args) if isinstance(args, dict) else args
    Bundle(Path(settings.bundle), settings.provider)
    return service_deployment(settings).bind(settings)


SETTINGS_ENV = "CLIPER_SERVE_ARGS"  # the settings of ``application``, a JSON object


def __getattr__(name: str) -> Application:
    """``application``: :func:`build` of the settings in :data:`SETTINGS_ENV`, for
    ``serve build cliper_prod.serving.ray_engine:application`` (and the config it writes)."""
    if name != "application":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raw = os.environ.get(SETTINGS_ENV)
    if raw is None:
        raise RuntimeSetupError(f"{SETTINGS_ENV} is not set: give the serve settings as a JSON "
                                f"object, e.g. {SETTINGS_ENV}='{{\"bundle\": \"/srv/bundle\"}}'")
    return build(ServeSettings.model_validate_json(raw))


def serve_config(settings: ServeSettings, *, replicas: int, host: str, port: int) -> dict:
    """The Serve config file equivalent to ``cliper-prod serve`` with these settings."""
    return {
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": BUILDER,
            "args": settings.model_dump(),
            "deployments": [{"name": CliperService.name, "num_replicas": replicas,
                             **_deployment_options(settings)}],
        }],
    }


def live_providers() -> dict[str, list[str]]:
    """The providers of one running replica's sessions (they all run the same settings)."""
    return serve.get_app_handle(APP_NAME).live_providers.remote().result()


def start_service(settings: ServeSettings, *, replicas: int = 1, host: str = "127.0.0.1",
                  port: int = 8000, address: str | None = None,
                  startup_timeout_s: float = 120.0) -> str:
    """Deploy on the running Ray (or join ``address``, or start a local one); return the URL
    once the application runs. Any failure on the way, or no running application within
    ``startup_timeout_s``, is a :class:`RuntimeSetupError` of one line (the traceback at
    DEBUG)."""
    connect(address)
    _check_gpus(settings.gpus_per_replica * replicas)
    deadline = time.monotonic() + startup_timeout_s
    try:
        # the controller's wait for a proxy to answer (5 s by default) is what a busy machine
        # missed: it gets the whole start-up time (on first start of Serve in the cluster)
        env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": str(startup_timeout_s)}
        serve.start(http_options={"host": host, "port": port},
                    controller_options={"runtime_env": {"env_vars": env}})
        deployment = service_deployment(settings, replicas)
        serve.run_many([RunTarget(deployment.bind(settings), name=APP_NAME, route_prefix="/")],
                       wait_for_applications_running=False)
        _wait_running(deadline, startup_timeout_s)
    except RuntimeSetupError:
        raise
    except Exception as exc:
        logger.debug("Ray Serve start-up failed", exc_info=True)
        raise RuntimeSetupError(f"Ray Serve did not start ({type(exc).__name__}: "
                                f"{first_line(exc)})") from exc
    return f"http://{host}:{port}"


def _check_gpus(needed: float) -> None:
    """Replicas asking for more GPUs than the cluster has would wait for them forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if needed > have:
        raise RuntimeSetupError(f"the replicas ask for {needed:g} GPU(s) and the Ray cluster has "
                                f"{have:g}; lower --gpus-per-replica or --replicas, or serve "
                                f"with --provider cpu")


def _wait_running(deadline: float, timeout_s: float) -> None:
    """Until the application runs; its failure or the deadline is a RuntimeSetupError."""
    while True:
        app_status = serve.status().applications.get(APP_NAME)
        state = app_status.status if app_status else ApplicationStatus.NOT_STARTED
        if state == ApplicationStatus.RUNNING:
            return
        if state in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise RuntimeSetupError(f"the service failed to deploy: "
                                    f"{shorten(app_status.message.strip() or state.value, 300)}")
        if time.monotonic() > deadline:
            raise RuntimeSetupError(f"the service was not running after {timeout_s:g} s "
                                    f"({state.value}); raise --startup-timeout-s on a busy "
                                    f"machine")
        time.sleep(0.5)


def stop_service() -> None:
    """Drain in-flight requests (graceful_shutdown_timeout_s), then stop Serve and Ray."""
    import ray

    serve.shutdown()
    ray.shutdown()
