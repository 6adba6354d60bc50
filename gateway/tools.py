"""Tool calling: the prompt that offers the tools, the grammar that forces a call, and the
parser that turns the model's output back into OpenAI's ``tool_calls``.

The same logic serves every backend, so every backend behaves alike:

- **Rendering.** A chat template that takes ``tools`` (Qwen, Llama 3.1, Hermes, Mistral)
  renders them itself. Any other template (SmolLM2's, the default) gets the *fallback*: a
  system message that lists the tools and asks for a JSON array of calls, and earlier
  calls and tool results rendered as text in that same format.
- **Forcing.** ``tool_choice`` ``required`` or a named function sends a JSON-schema guide
  (a list of ``{"name", "arguments"}`` objects whose ``arguments`` follow each tool's
  ``parameters``), so the arguments always parse and validate. ``none`` sends no tools.
- **``auto``** is a structural trigger, not a grammar: the model writes freely, and an
  answer that *starts* with a call (``[{`` in the fallback's format, or ``<tool_call>``, the
  Hermes/Qwen tag) is read as calls; one that doesn't is text. A grammar allowing both text
  and calls would force every text answer through the grammar engine and still not make a
  small model choose well; required/named are the guaranteed path.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from jsonschema import ValidationError, validators

from gateway.engine import Guide
from gateway.errors import invalid_request
from gateway.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from gateway.structured import check_schema

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}
_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"

FALLBACK_PROMPT = """You can call these tools (JSON schema of each one's arguments):
{tools}
To call tools, answer with only a JSON array of calls and nothing else:
[{{"name": "<tool name>", "arguments": {{<arguments>}}}}]
Otherwise answer normally."""


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolPlan:
    """What one chat request asks of tools, checked; ``None`` from ``plan`` when it asks nothing."""

    mode: Literal["auto", "required", "named"]
    tools: list[Tool]
    parallel: bool
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → arguments schema

    def guide(self) -> Guide | None:
        """The JSON-schema guide of the forced modes (None for ``auto``)."""
        if self.mode == "auto":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "arguments": schema},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, schema in self.schemas.items()
        ]
        item = calls[0] if len(calls) == 1 else {"anyOf": calls}
        most = len(calls) if self.parallel else 1
        array = {"type": "array", "items": item, "minItems": 1, "maxItems": most}
        return Guide("json_schema", orjson.dumps(array).decode(), param="tool_choice")


def plan(body: ChatCompletionRequest) -> ToolPlan | None:
    """Check ``tools`` / ``tool_choice`` and say what to do; None: no tools in play."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise invalid_request("tool_choice is only allowed when tools are specified", param="tool_choice")
        return None
    if choice == "none":
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise invalid_request("tools: function names must be unique", param="tools")
    schemas = {
        t.function.name: (
            json.loads(check_schema(t.function.parameters, f"tools[{i}].function.parameters"))
            if t.function.parameters is not None
            else NO_ARGUMENTS
        )
        for i, t in enumerate(body.tools)
    }
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in schemas:
            raise invalid_request(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return ToolPlan("named", body.tools, parallel=False, schemas={name: schemas[name]})
    return ToolPlan("required" if choice == "required" else "auto", body.tools, parallel, schemas)


# ---------------------------------------------------------------------------- rendering


def template_takes_tools(template: str) -> bool:
    return "tools" in template


def render_messages(messages: list[ChatMessage], tools: ToolPlan | None, native: bool) -> dict[str, Any]:
    """The chat template's variables: ``messages`` (and ``tools`` for a template that takes them).

    ``native``: the template renders tools itself (HF convention: ``arguments`` as a dict).
    Otherwise the fallback: tools described in a system message, calls and tool results as text.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if native:
            msg: dict[str, Any] = {"role": role, "content": m.text() if m.content is not None else None}
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                    }
                    for c in m.tool_calls
                ]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
            continue
        text = m.text()
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": _arguments(c.function.arguments)} for c in m.tool_calls]
            text = (text + "\n" if text else "") + json.dumps(calls)
        if role == "tool":  # templates without tools rarely know the role: a user turn says it
            role, text = "user", f"Result of tool call {m.tool_call_id}:\n{text}"
        out.append({"role": role, "content": text})
    if tools is None:
        return {"messages": out}
    if native:
        return {"messages": out, "tools": [t.model_dump(exclude_none=True) for t in tools.tools]}
    listing = "\n".join(
        json.dumps({"name": name, "description": _description(tools, name), "parameters": schema}, ensure_ascii=False)
        for name, schema in tools.schemas.items()
    )
    prompt = FALLBACK_PROMPT.format(tools=listing)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return {"messages": out}


def _description(tools: ToolPlan, name: str) -> str:
    return next((t.function.description or "" for t in tools.tools if t.function.name == name), "")


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---------------------------------------------------------------------------- parsing


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def parse_calls(text: str, tools: ToolPlan) -> list[ParsedCall] | None:
    """The calls a whole answer makes, or None when it is not (only) valid calls."""
    body = text.strip()
    if body.startswith(_TAG_OPEN):  # Hermes / Qwen: one <tool_call>{...}</tool_call> per call
        parts = re.findall(re.escape(_TAG_OPEN) + r"(.*?)" + re.escape(_TAG_CLOSE), body, re.S)
        try:
            raw = [json.loads(p) for p in parts]
        except ValueError:
            return None
    else:
        try:
            raw = json.loads(body)
        except ValueError:
            return None
        if isinstance(raw, dict):
            raw = [raw]
    if not isinstance(raw, list) or not raw:
        return None
    calls = []
    for item in raw:
        if not isinstance(item, dict) or item.get("name") not in tools.schemas:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        try:
            validators.validator_for(tools.schemas[item["name"]])(tools.schemas[item["name"]]).validate(arguments)
        except ValidationError:
            return None
        calls.append(ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


Event = tuple[Literal["text"], str] | tuple[Literal["call"], int, str, str] | tuple[Literal["args"], int, str]


class CallStream:
    """Turns a streamed answer into text pieces or tool-call deltas, as they arrive.

    Forced modes stream each call as it is written: the call's id, type and name as soon
    as its name is complete, then its ``arguments`` text piece by piece. ``auto`` holds the
    answer back only while it could still be a call; once it cannot, it flows as text.
    A call answer in ``auto`` is read whole at the end (it was not forced, so it may not parse).
    """

    _HEAD = re.compile(r'\s*[\[,]\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')

    def __init__(self, tools: ToolPlan) -> None:
        self.tools = tools
        self.forced = tools.mode != "auto"
        self.buffer = ""
        self.state: Literal["undecided", "text", "calls"] = "calls" if self.forced else "undecided"
        self.calls: list[ParsedCall] = []
        self.ids: list[str] = []
        # forced-mode scanner: where the next unread character is, and the current arguments value
        self._pos = 0
        self._in_args = False
        self._closing = False
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> Iterator[Event]:
        self.buffer += text
        if self.state == "text":
            yield ("text", text)
        elif self.state == "undecided":
            head = self.buffer.lstrip()
            if not head or head[0] in "[{" or _TAG_OPEN.startswith(head[: len(_TAG_OPEN)]):
                return  # empty, or could still be a call: hold it back
            self.state = "text"
            yield ("text", self.buffer)
        else:
            yield from self._scan()

    def _scan(self) -> Iterator[Event]:
        """The forced format: ``[{"name": "...", "arguments": {...}}, ...]``."""
        while True:
            if self._closing:  # past a call's arguments: skip to its closing brace
                close = self.buffer.find("}", self._pos)
                if close < 0:
                    return
                self._pos, self._closing = close + 1, False
            if not self._in_args:
                match = self._HEAD.match(self.buffer, self._pos)
                if match is None:
                    return
                self._pos = match.end()
                self._in_args, self._depth = True, 0
                call_id = new_call_id()
                self.ids.append(call_id)
                yield ("call", len(self.ids) - 1, call_id, json.loads(f'"{match.group(1)}"'))
            start = self._pos
            end = self._advance()
            if end > start:
                yield ("args", len(self.ids) - 1, self.buffer[start:end])
            if self._in_args:
                return
            self._closing = True

    def _advance(self) -> int:
        """Read the arguments value from ``_pos``; stop at its end or the buffer's."""
        buf = self.buffer
        i = self._pos
        while i < len(buf):
            ch = buf[i]
            i += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._in_args = False
                    break
        self._pos = i
        return i

    def finish(self) -> Iterator[Event]:
        """At the end of the answer: an ``auto`` answer held back is read whole."""
        if self.state != "undecided":
            return
        calls = parse_calls(self.buffer, self.tools)
        if calls is None:
            self.state = "text"
            if self.buffer:
                yield ("text", self.buffer)
            return
        self.state = "calls"
        for call in calls:
            self.ids.append(new_call_id())
            yield ("call", len(self.ids) - 1, self.ids[-1], call.name)
            yield ("args", len(self.ids) - 1, call.arguments)

    @property
    def made_calls(self) -> bool:
        return self.state == "calls" and bool(self.ids)


def whole_answer(text: str, tools: ToolPlan) -> tuple[str | None, list[dict[str, Any]] | None]:
    """A non-streamed answer: (content, tool_calls). Text that is not valid calls stays text."""
    calls = parse_calls(text, tools)
    if calls is None:
        return text, None
    return None, [
        {"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]
