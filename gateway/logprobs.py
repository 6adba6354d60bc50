"""Token logprobs from the engine (ids and numbers) → OpenAI's two ``logprobs`` shapes.

Engines return token ids; the text of each token comes from the served model's tokenizer
(``ChatTokenizer.token_bytes``), so that ``bytes`` is exact and the tokens joined give the
answer's text (special tokens such as the end-of-sequence add nothing).
"""

from __future__ import annotations

from typing import Any

from gateway.engine import TokenLogprobs
from gateway.tokenizer import ChatTokenizer

# OpenAI's stand-in for minus infinity (JSON has no infinities).
_FLOOR = -9999.0


def _entry(tokenizer: ChatTokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    raw = tokenizer.token_bytes(token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": max(logprob, _FLOOR), "bytes": list(raw)}


def chat_content(tokens: TokenLogprobs, k: int, tokenizer: ChatTokenizer) -> list[dict[str, Any]]:
    """``choices[].logprobs.content``: one entry per token, each with its k alternatives."""
    out = []
    for i, (token_id, logprob) in enumerate(zip(tokens.ids, tokens.logprobs, strict=False)):
        entry = _entry(tokenizer, token_id, logprob)
        alternatives = zip(tokens.top_ids[i * k : i * k + k], tokens.top_logprobs[i * k : i * k + k], strict=False)
        entry["top_logprobs"] = [_entry(tokenizer, t, v) for t, v in alternatives]
        out.append(entry)
    return out


def completion_logprobs(tokens: TokenLogprobs, k: int, tokenizer: ChatTokenizer, offset: int = 0) -> dict[str, Any]:
    """The legacy ``/v1/completions`` shape; ``offset``: where the text starts (after an echo)."""
    content = chat_content(tokens, k, tokenizer)
    offsets = []
    for entry in content:
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": [e["token"] for e in content],
        "token_logprobs": [e["logprob"] for e in content],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in content],
        "text_offset": offsets,
    }
