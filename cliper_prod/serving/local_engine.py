"""``cliper-prod serve --engine local``: the HTTP API (:mod:`cliper_prod.serving.api`) under
uvicorn, in worker processes on this machine. Ray is never imported here.

The parent binds the socket and starts ``workers`` processes (spawned, so nothing of the
parent's ONNX Runtime threads is forked), which accept from that one socket. Each loads the
bundle into its own :class:`~cliper_prod.serving.service.Service` (memory: each worker holds its
own ONNX sessions, the item table inside the top-K graph and any CLIP graphs; the user and
history tables are memory-mapped and shared through the page cache) with the local micro-batcher
and ``prometheus_client`` metrics, and reports that it is ready or why not: a worker that fails
to load fails the start (:class:`~cliper_prod.errors.RuntimeSetupError`, exit code 9).

Metrics run in prometheus_client's multiprocess mode, in a temporary folder the parent removes
at exit, so ``GET /metrics`` on any worker sums every worker's counts. :meth:`LocalServer.stop`
(the command calls it on SIGINT or SIGTERM) closes the socket and asks each worker to drain:
uvicorn stops accepting and finishes the requests in flight, for up to :data:`GRACE_S`. A worker
that dies while serving is replaced; one whose parent died stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import uvicorn
from fastapi import FastAPI, Request, Response

from cliper_prod.errors import CliperError, RuntimeSetupError
from cliper_prod.serving.api import create_app
from cliper_prod.serving.batching import batch
from cliper_prod.serving.metrics import MULTIPROC_DIR, PrometheusMetrics
from cliper_prod.messages import first_line
from cliper_prod.serving.service import ServeSettings, Service

logger = logging.getLogger(__name__)
GRACE_S = 20.0  # a draining worker's time to finish its requests (Ray's graceful_shutdown too)


def local_app(settings: ServeSettings, workers: int) -> FastAPI:
    """The API with this process's service, and ``GET /metrics`` (every worker's counts)."""
    service = Service(settings, PrometheusMetrics(), batch,
                      engine={"name": "local", "workers": workers},
                      replica=f"{socket.gethostname()}:{os.getpid()}")
    app = create_app(lambda: service)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    return app


async def metrics(request: Request) -> Response:
    """The application metrics of every worker, in Prometheus' text format."""
    text, content_type = PrometheusMetrics.exposition()
    return Response(text, media_type=content_type)


class WorkerServer(uvicorn.Server):
    """uvicorn that also stops when the parent that started it is gone."""

    def __init__(self, config: uvicorn.Config, parent: int) -> None:
        super().__init__(config)
        self.parent = parent

    async def on_tick(self, counter: int) -> bool:
        return await super().on_tick(counter) or os.getppid() != self.parent


def run_worker(settings: ServeSettings, workers: int, sock: socket.socket, report: Connection,
               parent: int, log_level: int) -> None:
    """A worker process: load, report ``("ready", providers)`` or ``("failed", reason)``, serve
    until told to drain. It logs as the command does (``-v``), on the command's stderr."""
    logging.basicConfig(format="%(levelname)s: [worker %(process)d] %(message)s")
    logging.getLogger("cliper_prod").setLevel(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; uvicorn takes it over
    try:
        app = local_app(settings, workers)
    except Exception as exc:
        logger.debug("worker start-up failed", exc_info=True)
        report.send(("failed", str(exc) if isinstance(exc, CliperError) else
                     f"{type(exc).__name__}: {first_line(exc)}"))
        return
    report.send(("ready", app.state.service().providers))
    report.close()
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None,
                            timeout_graceful_shutdown=GRACE_S)  # uvloop, httptools if there
    WorkerServer(config, parent).run(sockets=[sock])


@dataclass
class Worker:
    process: multiprocessing.process.BaseProcess
    report: Connection  # the parent's end of the pipe the worker reports its start on
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0  # replacements in a row of the worker in this slot (backoff)

    def exit_reason(self) -> str:
        """Why the worker ended: the failure it reported at start-up, else its exit code."""
        try:
            if self.report.poll():
                state, detail = self.report.recv()
                if state == "failed":
                    return detail
        except (EOFError, OSError):
            pass
        return f"exit code {self.process.exitcode}"


RESTART_MAX_S = 60.0  # longest wait before replacing a worker that keeps exiting
STABLE_S = 60.0  # a worker that served this long resets its slot's backoff


class LocalServer:
    """``workers`` uvicorn processes serving ``settings`` on ``host:port``."""

    def __init__(self, settings: ServeSettings, *, workers: int = 1, host: str = "127.0.0.1",
                 port: int = 8000) -> None:
        self.settings, self.count, self.host, self.port = settings, workers, host, port
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[Worker] = []
        self.socket: socket.socket | None = None
        self.metrics_dir: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float) -> dict[str, list[str]]:
        """Listen, start the workers and wait until each has loaded the bundle; return the
        providers of their sessions. A worker that fails, or not all ready within
        ``timeout_s``, is a :class:`RuntimeSetupError` (the others are stopped)."""
        try:
            self.metrics_dir = tempfile.mkdtemp(prefix="cliper-metrics-")
            self.socket = _listen(self.host, self.port)
            self.workers = [self._spawn() for _ in range(self.count)]
            return self._wait_ready(time.monotonic() + timeout_s, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> Worker:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(
            target=run_worker, name="cliper-serve-worker",
            args=(self.settings, self.count, self.socket, writer, os.getpid(),
                  logging.getLogger("cliper_prod").getEffectiveLevel()))
        with _environ(MULTIPROC_DIR, self.metrics_dir):  # a spawned process's environment
            process.start()
        writer.close()  # the worker holds its copy: once it exits, reading gives EOF
        return Worker(process, reader)

    def _wait_ready(self, deadline: float, timeout_s: float) -> dict[str, list[str]]:
        pending, providers = {w.report: w for w in self.workers}, {}
        while pending:
            ready = wait(list(pending), max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeSetupError(f"{len(pending)} of {self.count} worker(s) had not "
                                        f"loaded the bundle after {timeout_s:g} s; raise "
                                        f"--startup-timeout-s on a busy machine")
            for conn in ready:
                worker = pending.pop(conn)
                try:
                    state, detail = conn.recv()
                except EOFError:
                    worker.process.join(5)
                    state, detail = "failed", f"the worker exited ({worker.process.exitcode})"
                if state != "ready":
                    raise RuntimeSetupError(f"the service did not start: {detail}")
                providers = detail
        return providers

    def replace_dead(self) -> None:
        """Start a new worker for each one that exited while serving, after 1, 2, 4 ... up to
        :data:`RESTART_MAX_S` seconds when they keep exiting (one that served
        :data:`STABLE_S` resets the wait), so a worker that cannot start does not spin."""
        now = time.monotonic()
        for n, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            restarts = 0 if now - worker.started > STABLE_S else worker.restarts + 1
            wait_s = min(RESTART_MAX_S, 2.0 ** max(restarts - 1, 0)) if restarts else 0.0
            if now < worker.started + wait_s:
                continue
            logger.warning("worker %d exited (%s); starting another", worker.process.pid,
                           worker.exit_reason())
            worker.report.close()
            self.workers[n] = self._spawn()
            self.workers[n].restarts = restarts

    def stop(self) -> None:
        """Stop accepting, let each worker finish its requests (up to :data:`GRACE_S`), and
        remove the metrics folder."""
        if self.socket is not None:
            self.socket.close()  # the workers' copies close as they drain
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + GRACE_S + 5
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.report.close()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """``name`` set to ``value`` in this process's environment for the block only."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket the workers share; a port in use is a RuntimeSetupError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise RuntimeSetupError(f"cannot listen on {host}:{port} ({exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise RuntimeSetupError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock
