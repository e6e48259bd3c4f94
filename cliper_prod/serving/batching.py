"""Dynamic batching for the local engine, with the semantics of Ray Serve's ``serve.batch``.

A call waits in a queue; the first one of a batch waits up to ``batch_wait_timeout_s`` for others
(less once ``max_batch_size`` are waiting), then the whole batch goes to one call of the
decorated function, whose list of results is handed back in order, one per caller. One batch
runs at a time: calls arriving meanwhile queue for the next, so with a wait of 0 batches form
only from requests that queued behind a running one. A failure of the batch is every caller's.
:func:`batch` has ``serve.batch``'s keywords, so the service takes either as its batcher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``await batcher(item)``: ``item``'s result of one ``run(batch)`` (see the module
    docstring)."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int,
                 batch_wait_timeout_s: float) -> None:
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, batch_wait_timeout_s
        self.queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self.worker: asyncio.Task | None = None  # started by the first call, on its loop

    async def __call__(self, item: T) -> R:
        if self.worker is None:
            self.worker = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def _serve(self) -> None:
        while True:
            waiting = [(i, f) for i, f in await self._collect() if not f.done()]  # not cancelled
            if not waiting:
                continue
            try:
                results = await self.run([item for item, _ in waiting])
                if len(results) != len(waiting):
                    raise RuntimeError(f"a batch of {len(waiting)} gave {len(results)} results")
            except Exception as exc:
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(waiting, results):
                if not future.done():
                    future.set_result(result)

    async def _collect(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The next batch: the first waiting call, and those that come within the wait."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    batch.append(await self.queue.get())
            except TimeoutError:
                break
        return batch


def batch(max_batch_size: int, batch_wait_timeout_s: float
          ) -> Callable[[Callable[[list[T]], Awaitable[list[R]]]], MicroBatcher[T, R]]:
    """A decorator, as ``serve.batch(max_batch_size=..., batch_wait_timeout_s=...)`` is."""
    return lambda run: MicroBatcher(run, max_batch_size, batch_wait_timeout_s)
