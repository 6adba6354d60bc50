"""A test double for ``gateway.engine.Engine``: scripted pieces, recorded requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from gateway.engine import GenerationChunk, GenerationRequest, TokenLogprobs
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
    # With logprobs asked for: each piece is one token, its id taken from this tokenizer function.
    token_id: Callable[[str], int] | None = None

    def _tokens(self, request: GenerationRequest, pieces: list[str]) -> TokenLogprobs | None:
        if request.logprobs is None or self.token_id is None:
            return None
        k = request.logprobs
        ids = [self.token_id(p) for p in pieces]
        # The chosen token is the most likely one; its alternatives follow, each less likely.
        return TokenLogprobs(
            ids,
            [-0.5 * (i + 1) for i in range(len(ids))],
            [t for t in ids for _ in range(k)],
            [-0.5 * (i + 1) - j for i in range(len(ids)) for j in range(k)],
        )

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
                    self._tokens(request, pieces),
                )
                return
            for i, piece in enumerate(pieces):
                if self.fail_after is not None and i == self.fail_after:
                    raise UpstreamError("Triton broke off the answer")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield GenerationChunk(piece, tokens=self._tokens(request, [piece]))
            if self.report_counts:
                yield GenerationChunk("", finish, 7, len(pieces))
        finally:
            self.closed_streams += 1

    async def ready(self, models: list[str]) -> dict[str, bool]:
        return {"<server>": self.ready_state, **{m: self.ready_state for m in models}}

    async def close(self) -> None:
        return None
