"""The ``llm`` model's incremental detokenizer and stop-string matcher, without Triton."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from stack.paths import MODEL_REPOSITORY


@pytest.fixture(scope="module")
def llm() -> Any:
    # model.py imports Triton's backend utilities, which exist only inside Triton: a
    # minimal stand-in module is enough for its pure-Python helpers.
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    sys.modules.setdefault("triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("llm_model", MODEL_REPOSITORY / "llm" / "1" / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["llm_model"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "text",
    ["Ünïcödé café 東京 and 🚀✨ rockets", "  leading and  double  spaces ", "Streaming text, piece by piece."],
)
def test_incremental_decoding_joins_to_full_decode(
    llm: Any, tiny_model_dir: Path, smollm2_dir: Path, text: str
) -> None:
    from transformers import AutoTokenizer

    for folder in (tiny_model_dir, smollm2_dir):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoder = llm.IncrementalDecoder(tokenizer)
        pieces = [decoder.push(i) for i in ids]
        pieces.append(decoder.flush())
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces), "a multi-byte character was split"
        # Byte-level BPE splits these characters over several tokens: held back, not lost.
        if folder == tiny_model_dir and "東" in text:
            assert pieces.count("") > 0


def test_stop_matcher_never_releases_a_stop_string(llm: Any) -> None:
    m = llm.StopMatcher(["STOP", "\n\n"])
    out = []
    for piece in ["Hello S", "T", "O", "x then ", "ST", "OP and more"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert stopped
    assert "".join(out) == "Hello STOx then "


def test_stop_matcher_flushes_partial_prefix_at_end(llm: Any) -> None:
    m = llm.StopMatcher(["STOP"])
    text, stopped = m.feed("abc ST")
    assert (text, stopped) == ("abc ", False)
    assert m.flush() == "ST"


def test_stop_matcher_without_stops_is_passthrough(llm: Any) -> None:
    m = llm.StopMatcher([])
    assert m.feed("anything STOP") == ("anything STOP", False)
