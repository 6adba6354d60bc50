"""The served model's own tokenizer: chat template and token counts (no torch needed)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.errors import invalid_request

# Tokenizers without a limit report a huge sentinel as model_max_length.
_NO_LIMIT = 10**8
# Texts longer than this are tokenized off the event loop, in a way that releases the GIL:
# a 4 MiB prompt takes seconds, and every other client would wait for it.
OFF_LOOP_CHARS = 32 * 1024
# One worker: huge texts queue for it instead of tokenizing side by side, each with its own
# hundreds of MB of scratch memory.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # musl has none


_LIBC = _glibc()


def _trim_heap() -> None:
    """Hand freed scratch memory back to the OS (glibc keeps a thread's arena otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ChatTokenizer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.folder = folder
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(folder))
        # The Rust tokenizer directly: no Python-side special-token handling per call.
        self._fast = getattr(self.tokenizer, "backend_tokenizer", None) or getattr(self.tokenizer, "_tokenizer", None)
        template = getattr(self.tokenizer, "chat_template", None)
        if not template or not isinstance(template, str):
            raise ValueError(f"tokenizer in {folder} has no (single) chat template")
        # Render the compiled template directly: apply_chat_template's own per-call work
        # costs more than the rendering. Same compiler and variables, so the same text
        # (a unit test compares both); apply_chat_template stays the fallback.
        self._render: Any = None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._render = _compile_jinja_template(template).render
        except ImportError:  # pragma: no cover - depends on the transformers version
            pass
        self._variables = {k: v for k, v in self.tokenizer.special_tokens_map.items() if isinstance(v, str)}
        self.takes_tools = "tools" in template  # the template renders tool definitions itself
        self._token_bytes: dict[int, bytes] = {}
        self._special = set(self.tokenizer.all_special_ids)
        decoder = getattr(self._fast, "decoder", None)
        # Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2): token strings map back to bytes exactly.
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._unbyte: dict[str, int] = {}
        if self._byte_level:
            self._unbyte = {c: b for b, c in _bytes_to_unicode().items()}
        # No token stands for more text than the longest vocabulary entry (special tokens
        # included; byte-level and SentencePiece marks only make this larger): a lower bound
        # on a text's token count without tokenizing it.
        self.longest_token_bytes = max((len(t.encode()) for t in self.tokenizer.get_vocab()), default=1) or 1

    def context_length(self) -> int | None:
        limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        if 0 < limit < _NO_LIMIT:
            return limit
        config = self.folder / "config.json"
        if config.exists():
            value = json.loads(config.read_text()).get("max_position_embeddings")
            return int(value) if value else None
        return None

    def chat_prompt(self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            if self._render is not None:
                return str(self._render(messages=messages, add_generation_prompt=True, **self._variables, **extra))
            return str(
                self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True, **extra)
            )
        except Exception as exc:  # jinja's TemplateError and friends: the messages don't fit the template
            raise invalid_request(f"messages do not fit the model's chat template: {exc}", param="messages") from exc

    def upper_bound(self, text: str) -> int:
        """At least the token count of ``text``, without tokenizing: no token is shorter than
        one UTF-8 byte (special tokens are longer), plus one for a SentencePiece prefix space."""
        return len(text.encode()) + 1

    def lower_bound(self, text_bytes: int) -> int:
        """At most the token count of a text of ``text_bytes`` UTF-8 bytes."""
        return -(-text_bytes // self.longest_token_bytes)

    def count(self, text: str) -> int:
        if self._fast is not None:
            return len(self._fast.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def count_off_loop(self, text: str) -> int:
        """``count``, in the tokenizer's worker thread when ``text`` is long."""
        if len(text) < OFF_LOOP_CHARS:
            return self.count(text)
        return await asyncio.get_running_loop().run_in_executor(_WORKER, self._count_releasing_gil, text)

    def _count_releasing_gil(self, text: str) -> int:
        # The Rust tokenizer's encode() holds the GIL throughout; encode_batch() lets it go.
        try:
            if self._fast is not None:
                return len(self._fast.encode_batch([text], add_special_tokens=False)[0])
            return self.count(text)
        finally:
            _trim_heap()  # here, not on the event loop: it takes tens of ms after a huge text

    async def chat_prompt_off_loop(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """``chat_prompt``, in the worker thread when the messages are long (rendering a
        template over megabytes takes tens of ms; in a thread the GIL is shared every 5 ms)."""
        size = sum(len(c) for m in messages if isinstance(c := m.get("content"), str))
        if size < OFF_LOOP_CHARS:
            return self.chat_prompt(messages, tools)
        return await asyncio.get_running_loop().run_in_executor(_WORKER, self.chat_prompt, messages, tools)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one generated token adds to the text (special tokens add none)."""
        cached = self._token_bytes.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._special:
            out = b""
        elif self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            out = bytes(self._unbyte.get(c, 0) for c in piece)
        else:  # SentencePiece and others: decode it alone (a leading space may be lost)
            out = self.tokenizer.decode([token_id]).encode()
        self._token_bytes[token_id] = out
        return out
