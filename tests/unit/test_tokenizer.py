"""The gateway's tokenizer wrapper: same text as transformers, cheap bounds that hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.tokenizer import ChatTokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé 東京 🚀"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "  spaces  and\nnewlines\n"},
    ],
]


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request: pytest.FixtureRequest, tiny_model_dir: Path, smollm2_dir: Path) -> ChatTokenizer:
    return ChatTokenizer(tiny_model_dir if request.param == "tiny" else smollm2_dir)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_prompt_equals_apply_chat_template(tokenizer: ChatTokenizer, messages: list[dict[str, str]]) -> None:
    expected = tokenizer.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.chat_prompt(messages) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_upper_bound_holds(tokenizer: ChatTokenizer, messages: list[dict[str, str]]) -> None:
    text = tokenizer.chat_prompt(messages)
    assert tokenizer.count(text) <= tokenizer.upper_bound(text)
    assert tokenizer.count(text) == len(tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"])
