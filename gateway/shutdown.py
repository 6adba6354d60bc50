"""Graceful shutdown: SIGTERM drains the gateway instead of cutting answers off.

1. New and queued requests get a 503 in the envelope (``Retry-After``, ``Connection: close``)
   and ``/health`` turns 503, so a load balancer takes this gateway out.
2. Running requests get ``shutdown_grace_s`` to finish.
3. Then what still runs is cut off properly: a stream gets an error event and ``[DONE]``,
   a whole answer a 503. Only then does uvicorn close the connections and exit.

A second signal skips the wait (uvicorn's own shutdown); a third forces the exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("gateway")


class Shutdown:
    """The state a drain needs: whether it began, whether the grace ran out, and the tasks
    of the requests in progress (to interrupt when it did)."""

    def __init__(self) -> None:
        self.draining = False
        self.stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Mark the current task as working on a request until the block ends."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - always inside a task under ASGI
            yield
            return
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    def stop(self) -> int:
        """Interrupt every guarded task; each ends its answer itself (``stopping`` is set)."""
        self.stopping = True
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain of ``grace`` seconds before its own shutdown on SIGTERM/SIGINT."""

    def __init__(self, config: uvicorn.Config, grace: float) -> None:
        super().__init__(config)
        self.grace = grace
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        serving = getattr(getattr(self.config.app, "state", None), "serving", None)
        if self._drain is not None or serving is None or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # again, or before startup: uvicorn's own way
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - the handler runs inside the loop's thread
            super().handle_exit(sig, frame)
            return
        self._drain = loop.create_task(self._drain_then_exit(serving, sig))

    async def _drain_then_exit(self, serving: Any, sig: int) -> None:
        try:
            serving.drain()
            deadline = time.monotonic() + self.grace
            log.info("draining: %d engine requests in flight, up to %.0f s", serving.in_flight(), self.grace)
            while serving.in_flight() and time.monotonic() < deadline:  # noqa: ASYNC110 - once, at shutdown
                await asyncio.sleep(0.05)
            cut = serving.shutdown.stop()
            if cut:
                log.warning("shutdown grace over: ending %d answers with an error", cut)
                # Let them write their error event and [DONE] before connections close.
                for _ in range(40):
                    if not serving.in_flight():
                        break
                    await asyncio.sleep(0.05)
        finally:
            super().handle_exit(sig, None)
