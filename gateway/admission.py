"""Admission control per served model: a bounded number of engine requests in flight, a
bounded FIFO queue in front, and a fast, honest "no" beyond it.

Why not ``asyncio.Semaphore``: it has no bound on its waiters, no per-waiter deadline, no
weights (a request with ``n`` choices runs ``n`` sequences in the engine) and no way to turn
every waiter away at once on shutdown. The rest (rate limits, fairness across API keys) is a
proxy's job; docs/api.md says which.

Queued requests get no HTTP headers while they wait: a 200 that later turns into an error
event would be a lie to every client that checks the status. The wait is bounded instead
(``max_queue_wait_s``), so the status always comes within that bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from gateway.config import Limits
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics

# Seconds a client is told to wait before it tries again.
QUEUE_FULL_RETRY_AFTER = 1
QUEUE_TIMEOUT_RETRY_AFTER = 5
SHUTDOWN_RETRY_AFTER = 10


def overloaded(status: int, message: str, code: str, retry_after: int) -> APIError:
    kind = "rate_limit_error" if status == 429 else "server_error"
    return APIError(status, message, type=kind, code=code, headers={"Retry-After": str(retry_after)})


def shutting_down() -> APIError:
    error = overloaded(503, "The server is shutting down; try again shortly", "shutting_down", SHUTDOWN_RETRY_AFTER)
    assert error.headers is not None
    error.headers["Connection"] = "close"  # the next request belongs on another gateway
    return error


@dataclass
class _Waiter:
    weight: int
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Admission:
    """At most ``limits.max_in_flight`` engine requests of one model run at once."""

    def __init__(self, model: str, limits: Limits, metrics: GatewayMetrics) -> None:
        self.model = model
        self.limits = limits
        self.capacity = limits.max_in_flight
        self.used = 0
        self.closed = False
        self._waiters: deque[_Waiter] = deque()
        self._in_flight = metrics.in_flight.labels(model)
        self._queued = metrics.queued.labels(model)
        self._rejected = metrics.rejected

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self, weight: int) -> AsyncIterator[None]:
        """Hold ``weight`` engine requests' worth of room (at most the whole capacity)."""
        weight = min(max(weight, 1), self.capacity)
        await self._acquire(weight)
        try:
            yield
        finally:
            self._release(weight)

    async def _acquire(self, weight: int) -> None:
        if self.closed:
            self._reject("shutting_down")
            raise shutting_down()
        if not self._waiters and self.used + weight <= self.capacity:
            self._take(weight)
            return
        if len(self._waiters) >= self.limits.max_queue:
            self._reject("queue_full")
            raise overloaded(
                429,
                f"Too many requests for '{self.model}': {self.capacity} in flight and "
                f"{self.limits.max_queue} waiting; try again shortly",
                "queue_full",
                QUEUE_FULL_RETRY_AFTER,
            )
        waiter = _Waiter(weight)
        self._waiters.append(waiter)
        self._queued.set(len(self._waiters))
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.limits.max_queue_wait_s)
        except BaseException as exc:
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release(weight)  # granted in the same instant the client left or time ran out
            else:
                waiter.future.cancel()
                self._forget(waiter)
            if isinstance(exc, TimeoutError):
                self._reject("queue_timeout")
                raise overloaded(
                    503,
                    f"'{self.model}' is busy: no room within {self.limits.max_queue_wait_s:g} s; try again shortly",
                    "queue_timeout",
                    QUEUE_TIMEOUT_RETRY_AFTER,
                ) from None
            raise

    def _take(self, weight: int) -> None:
        self.used += weight
        self._in_flight.set(self.used)

    def _release(self, weight: int) -> None:
        self.used -= weight
        # FIFO: the head waits until it fits, so big requests are not starved by small ones.
        while self._waiters and self.used + self._waiters[0].weight <= self.capacity:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self.used += waiter.weight
                waiter.future.set_result(None)
        self._in_flight.set(self.used)
        self._queued.set(len(self._waiters))

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._queued.set(len(self._waiters))
        self._release(0)  # the head may fit now

    def _reject(self, reason: str) -> None:
        self._rejected.labels(self.model, reason).inc()

    def close(self) -> None:
        """Shutdown: turn away everyone waiting and everyone who comes."""
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self._reject("shutting_down")
                waiter.future.set_exception(shutting_down())
        self._queued.set(0)
