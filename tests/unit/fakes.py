"""A test double for ``gateway.engine.Engine``: scripted pieces, recorded requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.engine import GenerationChunk, GenerationRequest
from gateway.errors import UpstreamError, UpstreamUnavailable


@dataclass
class FakeEngine:
    pieces: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    report_counts: bool = True
    fail_before: bool = False
    fail_after: int | None = None  # raise UpstreamError after this many pieces
    delay_s: float = 0.0
    ready_state: bool = True
    requests: list[tuple[str, GenerationRequest]] = field(default_factory=list)
    closed_streams: int = 0

    async def generate(self, model: str, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append((model, request))
        if self.fail_before:
            raise UpstreamUnavailable("Triton at http://fake is unreachable")
        pieces = self.pieces[: request.max_tokens]
        finish = "length" if len(self.pieces) >= request.max_tokens else "stop"
        try:
            if not request.stream:
                yield GenerationChunk(
                    "".join(pieces),
                    finish if self.report_counts else None,
                    7 if self.report_counts else None,
                    len(pieces) if self.report_counts else None,
                )
                return
            for i, piece in enumerate(pieces):
                if self.fail_after is not None and i == self.fail_after:
                    raise UpstreamError("Triton broke off the answer")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield GenerationChunk(piece)
            if self.report_counts:
                yield GenerationChunk("", finish, 7, len(pieces))
        finally:
            self.closed_streams += 1

    async def ready(self, models: list[str]) -> dict[str, bool]:
        return {"<server>": self.ready_state, **{m: self.ready_state for m in models}}

    async def close(self) -> None:
        return None
