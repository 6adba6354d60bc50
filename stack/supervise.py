"""``make serve``'s supervision: Triton is restarted when it dies, the gateway keeps running.

``Supervisor.serve()`` starts Triton (waits until it and its models are ready), then the
gateway, and watches both:

* tritonserver exits (crash, OOM kill, ``kill -9``): what is left of its process group (the
  Python backend's stubs, which ignore SIGTERM and would keep the model's memory) is
  SIGKILLed at once, then Triton is started again on the same ports after a backoff of
  1 s, 2 s, 4 s ... up to ``Backoff.cap``; a Triton that stayed up ``Backoff.reset_after``
  seconds starts again at 1 s. Meanwhile the gateway answers 503 (``/health`` too) and
  reconnects by itself once Triton is back; streams in flight end with an error event and
  ``data: [DONE]``.
* the gateway exits: everything stops and ``serve()`` returns 1 (as before).
* ``stop()`` (another thread) or Ctrl-C / SIGTERM (``make serve``): the gateway, then Triton,
  are stopped; no stub survives.

tritonserver also gets SIGTERM if the thread that started it dies (``PR_SET_PDEATHSIG``,
``stack.triton_native``), so a supervisor killed with SIGKILL leaves no Triton behind.
Run ``serve()`` in a thread that lives as long as Triton should (``make serve``: the main one).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stack.gateway_process import Gateway
from stack.triton_native import TritonError, TritonServer


@dataclass
class Backoff:
    """Delay before restart number n: ``initial`` × ``factor``^(n-1), at most ``cap``; back to
    ``initial`` after an uptime of ``reset_after`` seconds."""

    initial: float = 1.0
    factor: float = 2.0
    cap: float = 30.0
    reset_after: float = 60.0
    _next: float = field(default=0.0, init=False)

    def delay(self, uptime: float) -> float:
        """The wait before the next start, for a process that ran ``uptime`` seconds."""
        if uptime >= self.reset_after or self._next == 0.0:
            self._next = self.initial
        delay = self._next
        self._next = min(self._next * self.factor, self.cap)
        return delay


@dataclass
class Restart:
    """One restart of Triton, for the log and the tests."""

    exit_code: int | None
    uptime_s: float
    killed_stubs: list[int]
    delay_s: float
    ready_after_s: float | None = None  # from the exit to ready again (None: not yet)


class Supervisor:
    """Triton (restarted when it dies) and the gateway (``start_gateway()``; optional)."""

    def __init__(
        self,
        triton: TritonServer,
        models: Sequence[str],
        start_gateway: Callable[[], Gateway] | None = None,
        *,
        backoff: Backoff | None = None,
        ready_timeout: float = 300.0,
        poll_interval: float = 0.2,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.triton = triton
        self.models = list(models)
        self._start_gateway = start_gateway
        self.gateway: Gateway | None = None
        self.backoff = backoff or Backoff()
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.log = log or (lambda msg: print(f"serve: {msg}", file=sys.stderr, flush=True))
        self.restarts: list[Restart] = []
        self.ready = threading.Event()  # set once Triton and the gateway first answer
        self._stop = threading.Event()
        self._started_at = 0.0

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Ask ``serve()`` (running in another thread) to stop everything and return."""
        self._stop.set()

    def serve(self) -> int:
        """Start, watch and restart until ``stop()`` or the gateway exits; stop both at the end.

        0 after ``stop()``; 1 when the first start failed or the gateway exited. Raises
        ``TritonError`` / ``GatewayError`` when the first start fails.
        """
        try:
            self._start_first()
            self.ready.set()
            return self._watch()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Stop the gateway, then Triton and whatever is left of its process group."""
        running = [p for p in (self.gateway and self.gateway.process, self.triton.process) if p and p.poll() is None]
        if running:
            print("stopping the gateway and Triton", flush=True)
        if self.gateway is not None:
            self.gateway.stop()
        self.triton.stop()

    # ------------------------------------------------------------------ internals

    def _start_first(self) -> None:
        self.triton.start()
        self._started_at = time.monotonic()
        self.triton.wait_ready(self.models, timeout=self.ready_timeout)
        if self._start_gateway is not None:
            self.gateway = self._start_gateway()

    def _watch(self) -> int:
        restart: Restart | None = None  # the one in progress until Triton is ready again
        exited_at = 0.0
        start_at: float | None = None  # when the next start is due
        while not self._stop.wait(self.poll_interval):
            gateway = self.gateway
            if gateway is not None and gateway.process.poll() is not None:
                self.log(f"the gateway exited with code {gateway.process.returncode}")
                return 1
            proc = self.triton.process
            now = time.monotonic()
            if start_at is None and proc is not None and proc.poll() is not None:
                uptime = now - self._started_at
                killed = self.triton.kill_group()
                delay = self.backoff.delay(uptime)
                restart = Restart(proc.returncode, uptime, killed, delay)
                self.restarts.append(restart)
                exited_at, start_at = now, now + delay
                self.log(
                    f"Triton exited with code {proc.returncode} after {uptime:.1f} s"
                    + (f"; killed what was left of it (pids {', '.join(map(str, killed))})" if killed else "")
                    + f"; starting it again in {delay:.0f} s (log: {self.triton.log_file})"
                )
            elif start_at is not None and now >= start_at:
                start_at = None
                self._started_at = now
                try:
                    self.triton.start()
                except TritonError as exc:  # e.g. its port taken meanwhile: counts as an exit
                    self.log(f"cannot start Triton: {exc}")
                    delay = self.backoff.delay(0.0)
                    start_at = time.monotonic() + delay
                    self.log(f"trying again in {delay:.0f} s")
            elif restart is not None and start_at is None and self.triton.is_ready(self.models):
                restart.ready_after_s = time.monotonic() - exited_at
                self.log(f"Triton is ready again, {restart.ready_after_s:.1f} s after it exited")
                restart = None
        return 0
