"""Where the embed pipeline decodes images: a pool of threads, or of worker processes.

Both take one item at a time and give back a future of its uint8 pixels [3, crop, crop] (or
the reason there are none), so the driver (:mod:`cliper_prod.features.embed`) is the same for
both; each also offers a thread pool for the rest of a batch's host work (tokenising), so
the driver, the one thread that does not scale with cores, keeps only what must run in order.
Threads are enough while Pillow, which releases the interpreter lock while it decodes and
resizes, does most of the work; worker processes take the decoding out of the driver's
interpreter altogether, for machines where the lock serialises threads (many cores beside a
busy driver).

Worker processes (started with ``spawn``: the parent may already run ONNX Runtime, torch or
tokenizer threads, which ``fork`` would copy mid-state) write the pixels into a block of shared
memory, a few slots per worker, so images are never pickled; only the file names (or a Parquet
row's encoded bytes) go to the worker, a few at a time, and slot numbers come back. One
dispatcher thread in the parent feeds the workers and resolves the futures. A worker that dies
(killed, or a decoder crash) is reported in the log and replaced; the images it held are
decoded again by another, and an image whose second attempt kills a worker too gets the death
as its decode error, so the per-item policy lists it in ``errors.jsonl``: nothing is lost
silently. On any exit (the end,
an error, Ctrl-C, SIGTERM turned into an exception by the CLI) the workers are stopped and the
shared block is unlinked; a parent killed outright leaves workers that exit at the end of
their pipe, and the block to ``multiprocessing``'s resource tracker, which unlinks it.

As with any ``spawn`` start, a script that runs the pipeline with processes from its top level
needs the ``if __name__ == "__main__":`` guard (the CLI has it).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import signal
import threading
import uuid
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cliper_prod.errors import CliperError
from cliper_prod.features.image_preprocess import ClipImagePreprocessor, ImageDecodeError
from cliper_prod.features.items import Item
from cliper_prod.messages import shorten

logger = logging.getLogger(__name__)

DECODER_KINDS = ("threads", "processes")
GROUP = 4  # images per message to a worker, and per answer: fewer messages, fewer wake-ups
SLOTS_PER_WORKER = 2 * GROUP  # a worker decodes one group while the next waits in its pipe
ATTEMPTS = 2  # an image whose decoding killed a worker is tried once more, then reported
FAILED_STARTS = 3  # workers in a row that die before they are ready: the run stops
SHM_PREFIX = "cliper-decode-"  # names of the shared blocks (/dev/shm on Linux)

Decode = Callable[[Item], "Future[np.ndarray | str]"]


@dataclass(frozen=True)
class ImageSource:
    """What a decoder needs of an item (sent to a worker process instead of the whole item)."""

    path: Path | None
    data: bytes | None
    name: str | None

    @classmethod
    def of(cls, item: Item) -> "ImageSource":
        return cls(item.image, item.image_bytes, item.image_name)


def decode_source(preprocess: ClipImagePreprocessor, source: ImageSource) -> np.ndarray | str:
    """uint8 pixels [3, H, W], or the reason there are none, naming the image as the item gives
    it (a served request's path, never the server's; bytes from Parquet by their file and
    row)."""
    try:
        if source.data is not None:
            return preprocess.decode(io.BytesIO(source.data), shorten(source.name), uint8=True)
        if source.path is None:
            return "no 'image' field"
        return preprocess.load(source.path, shorten(source.name or str(source.path)),
                               uint8=True)
    except ImageDecodeError as exc:
        return str(exc)


def load_image(preprocess: ClipImagePreprocessor, item: Item) -> np.ndarray | str:
    """An item's pixels or the reason there are none (:func:`decode_source`)."""
    return decode_source(preprocess, ImageSource.of(item))


@dataclass(frozen=True)
class Decoders:
    """Where a run's host-side work goes: ``image`` takes an item and returns the future of its
    pixels; ``host`` runs the rest of a batch's preparation (its view prompts' token ids) off
    the driver thread: the decode threads themselves, or with worker processes one thread
    beside the dispatcher."""

    image: Decode
    host: Executor


@contextmanager
def open_decoders(kind: str, preprocess: ClipImagePreprocessor, workers: int
                  ) -> Iterator[Decoders]:
    """``workers`` decoders of ``kind`` ("threads" or "processes")."""
    if kind == "threads":
        with ThreadPoolExecutor(workers, thread_name_prefix="embed-decode") as pool:
            yield Decoders(lambda item: pool.submit(load_image, preprocess, item), pool)
        return
    pool = ProcessDecoders(preprocess, workers)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="embed-text") as host:
            yield Decoders(pool.submit, host)
    finally:
        pool.close()


def _worker_main(conn: Connection, shm_name: str, shape: tuple[int, ...], index: int,
                 preprocess: ClipImagePreprocessor) -> None:
    """Decode worker ``index``: a group of (slot, source) in, pixels into those slots of its
    part of the shared block (``shape``: slots, 3, H, W), the group's (slot, None | reason |
    exception) out; stops at None or when the parent's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    shm = SharedMemory(shm_name)
    slots = np.ndarray(shape, np.uint8, buffer=shm.buf, offset=index * int(np.prod(shape)))
    try:
        conn.send(None)  # started: a death from here on is a decoder's, not the start-up's
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if task is None:
                break
            answers = []
            for slot, source in task:
                try:
                    got = decode_source(preprocess, source)
                    if not isinstance(got, str):
                        slots[slot] = got
                        got = None
                except Exception as exc:  # a bug, not a bad image: the driver raises it
                    got = RuntimeError(f"decode worker: {type(exc).__name__}: {exc}")
                answers.append((slot, got))
            try:
                conn.send(answers)
            except OSError:  # the parent is gone
                break
    finally:
        del slots
        shm.close()


@dataclass
class _Task:
    source: ImageSource
    future: Future
    attempts: int = 0


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    held: dict[int, _Task] = field(default_factory=dict)  # slot -> the task decoding there
    broken: bool = False  # its pipe refused a task: it is dying, its sentinel will say so
    started: bool = False  # it said so; a death before that is a failed start


class ProcessDecoders:
    """``workers`` decode processes fed by a dispatcher thread (see the module docstring)."""

    def __init__(self, preprocess: ClipImagePreprocessor, workers: int) -> None:
        self.preprocess = preprocess
        self.context = multiprocessing.get_context("spawn")
        self.shape = (workers, SLOTS_PER_WORKER, 3, preprocess.crop, preprocess.crop)
        try:
            self.shm = SharedMemory(create=True, size=int(np.prod(self.shape)),
                                    name=f"{SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        except OSError as exc:
            raise CliperError(f"no shared memory for the decode workers ({exc.strerror}); run "
                              f"with --decoders threads") from None
        self.slots = np.ndarray(self.shape, np.uint8, buffer=self.shm.buf)
        self.pending: deque[_Task] = deque()
        self.lock = threading.Lock()
        self.closing = False
        self.failure: BaseException | None = None
        self.failed_starts = 0
        self.wake_r, self.wake_w = os.pipe()
        self.workers: list[_Worker] = []
        try:
            for index in range(workers):  # one by one: a failure stops those already started
                self.workers.append(self._start(index))
        except BaseException:
            self._stop_workers()
            self._release()
            raise
        self.dispatcher = threading.Thread(target=self._dispatch, name="embed-decode-dispatch",
                                           daemon=True)
        self.dispatcher.start()

    def _start(self, index: int) -> _Worker:
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=_worker_main, name=f"cliper-decode-{index}", daemon=True,
            args=(child, self.shm.name, self.shape[1:], index, self.preprocess))
        process.start()
        child.close()
        return _Worker(process, parent)

    def submit(self, item: Item) -> "Future[np.ndarray | str]":
        future: Future = Future()
        with self.lock:
            if self.failure is not None:
                raise RuntimeError("the decode workers stopped") from self.failure
            idle = not self.pending  # else the dispatcher feeds it with the next result
            self.pending.append(_Task(ImageSource.of(item), future))
        if idle:
            os.write(self.wake_w, b"x")
        return future

    def _dispatch(self) -> None:
        try:
            while not self.closing:
                self._feed()
                waits = {self.wake_r: None}
                for w in self.workers:
                    waits[w.conn] = w
                    waits[w.process.sentinel] = w
                for ready in wait(list(waits)):
                    if ready == self.wake_r:
                        os.read(self.wake_r, 4096)
                    elif waits[ready] in self.workers and not self.closing:
                        self._receive(waits[ready])  # not a worker replaced a moment ago
        except BaseException as exc:  # resolve every future, so the driver never waits forever
            with self.lock:
                self.failure = exc
                tasks = list(self.pending) + [t for w in self.workers for t in w.held.values()]
                self.pending.clear()
            for task in tasks:
                if not task.future.done():
                    task.future.set_exception(exc)

    def _feed(self) -> None:
        """Give pending images to the workers with free slots, the emptiest first, a group
        at a time."""
        with self.lock:
            while self.pending:
                open_ = [w for w in self.workers if not w.broken]
                worker = min(open_, key=lambda w: len(w.held), default=None)
                if worker is None or len(worker.held) == SLOTS_PER_WORKER:
                    return
                free = [s for s in range(SLOTS_PER_WORKER) if s not in worker.held]
                group = [(slot, self.pending.popleft())
                         for slot in free[:min(GROUP, len(self.pending))]]
                try:
                    worker.conn.send([(slot, task.source) for slot, task in group])
                except OSError:  # it died: the group was never given, it keeps its attempts
                    worker.broken = True
                    self.pending.extendleft(reversed([task for _, task in group]))
                    continue
                worker.held.update(group)

    def _receive(self, worker: _Worker) -> None:
        """Results ready on ``worker``'s pipe, or its death."""
        index = self.workers.index(worker)
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message is None:
                    worker.started = True
                    self.failed_starts = 0
                    continue
                for slot, got in message:
                    task = worker.held.pop(slot)
                    if isinstance(got, BaseException):
                        task.future.set_exception(got)
                    else:
                        task.future.set_result(self.slots[index, slot].copy() if got is None
                                               else got)
            if worker.process.is_alive():
                return
        except (EOFError, OSError):  # its end of the pipe closed: it is exiting
            pass
        worker.process.join(timeout=5)
        if worker.process.is_alive():  # closed its pipe yet lives on: not a worker any more
            worker.process.kill()
            worker.process.join()
        self._replace(index, worker)

    def _replace(self, index: int, dead: _Worker) -> None:
        """Start a worker in place of ``dead``; its images go back to the queue, or, after
        their last attempt, get the death as their error."""
        code = dead.process.exitcode or 0
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        dead.conn.close()
        self.failed_starts += not dead.started
        if self.failed_starts >= FAILED_STARTS:  # nothing will start in its place either
            raise CliperError(f"image decode worker processes could not start ({how}; the "
                              f"error is above); run with --decoders threads")
        again = []
        for task in dead.held.values():
            task.attempts += dead.started  # a worker that never started decoded nothing
            name = shorten(task.source.name or str(task.source.path))
            if task.attempts < ATTEMPTS:
                again.append(task)
            else:
                task.future.set_result(f"image decoder process died ({how}) on it twice: {name}")
        logger.warning("decode worker %d (pid %s) died (%s); %d image(s) it held are decoded "
                       "again, %d reported as errors", index, dead.process.pid, how, len(again),
                       len(dead.held) - len(again))
        with self.lock:
            self.pending.extendleft(reversed(again))
        self.workers[index] = self._start(index)

    def close(self) -> None:
        """Stop the dispatcher and the workers, unlink the shared block (every exit path)."""
        self.closing = True
        os.write(self.wake_w, b"x")
        self.dispatcher.join()
        self._stop_workers()
        with self.lock:
            leftover = list(self.pending) + [t for w in self.workers for t in w.held.values()]
        for task in leftover:
            task.future.cancel()
        self._release()

    def _stop_workers(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):  # already dead
                pass
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()

    def _release(self) -> None:
        del self.slots
        self.shm.close()
        self.shm.unlink()
        os.close(self.wake_r)
        os.close(self.wake_w)
