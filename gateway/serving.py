"""Serving logic: OpenAI requests in, a ``Run`` per request, OpenAI answers back.

No FastAPI here: the routers hand over validated protocol models and get back either a
JSON body or an async iterator of SSE bytes. This module checks what a request asks for
and turns it into engine requests (one per choice); ``gateway.run.Run`` carries it out,
and ``gateway.responses`` writes the answer. Errors are ``APIError``; an error before the
first generated piece surfaces as the HTTP status, an error after it as an SSE event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace

from gateway.config import GatewaySettings, ModelSettings
from gateway.engine import Engine, GenerationRequest, Guide
from gateway.errors import invalid_request, model_not_found
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    UNSUPPORTED_CHAT_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
)
from gateway.responses import ChatShape, CompletionShape, Shape
from gateway.run import Prompt, Run
from gateway.structured import response_guide
from gateway.tokenizer import ChatTokenizer
from gateway.tools import ToolPlan, plan, render_messages

_UINT64 = (1 << 64) - 1


@dataclass
class ServedModel:
    name: str
    settings: ModelSettings
    tokenizer: ChatTokenizer
    context_length: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.context_length = self.settings.context_length or self.tokenizer.context_length()


class Serving:
    def __init__(
        self,
        settings: GatewaySettings,
        engine: Engine,
        tokenizers: Mapping[str, ChatTokenizer],
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or GatewayMetrics()
        self.created = int(time.time())
        self.models = {name: ServedModel(name, model, tokenizers[name]) for name, model in settings.models.items()}

    # ------------------------------------------------------------------ models

    def model_list(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.models])

    def model_card(self, name: str) -> ModelCard:
        if name not in self.models:
            raise model_not_found(name)
        return ModelCard(id=name, created=self.created)

    def served(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            raise model_not_found(name) from None

    async def health(self) -> dict[str, bool]:
        return await self.engine.ready(list(self.models))

    # ------------------------------------------------------------------ requests

    def _generation(
        self,
        served: ServedModel,
        body: SamplingFields,
        prompt: Prompt,
        limit: int | None,
        guide: Guide | None = None,
        logprobs: int | None = None,
    ) -> GenerationRequest:
        defaults = served.settings.defaults
        context = served.context_length
        max_tokens = limit if limit is not None else defaults.max_tokens
        # The cheap bound settles almost every request; only a near miss is tokenized.
        if context is not None and prompt.at_most() + max_tokens > context and prompt.tokens() + max_tokens > context:
            prompt_tokens = prompt.tokens()
            room = context - prompt_tokens
            if limit is not None or room < 1:
                raise invalid_request(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in "
                    "the completion). Please reduce the length of the messages or completion.",
                    param="messages" if room < 1 else "max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = room  # no explicit limit asked: fill what the context leaves
        temperature = body.temperature if body.temperature is not None else defaults.temperature
        top_k = defaults.top_k if body.top_k is None else body.top_k
        if top_k is not None and top_k <= 0:
            top_k = None  # 0 and -1 both mean "no top-k"; engines disagree on which, so send neither
        top_p = body.top_p if body.top_p is not None else defaults.top_p
        if top_p == 0:  # OpenAI clients sometimes send 0 for "most likely only"
            top_p, top_k = None, 1
        return GenerationRequest(
            prompt=prompt.text,
            max_tokens=max_tokens,
            stream=body.stream,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=(
                body.repetition_penalty if body.repetition_penalty is not None else defaults.repetition_penalty
            ),
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            seed=body.seed & _UINT64 if body.seed is not None else None,
            stop=body.stop_list(),
            guide=guide,
            logprobs=logprobs,
            min_tokens=body.min_tokens or None,
            ignore_eos=body.ignore_eos,
        )

    def _fan_out(self, req: GenerationRequest, n: int) -> list[GenerationRequest]:
        # n choices with one seed must still differ: choice i samples with seed + i.
        if n == 1:
            return [req]
        return [replace(req, seed=((req.seed + i) & _UINT64) if req.seed is not None else None) for i in range(n)]

    def _run(
        self,
        served: ServedModel,
        shape: type[Shape],
        body: SamplingFields,
        prompts: list[Prompt],
        echo: bool = False,
        guide: Guide | None = None,
        logprobs: int | None = None,
        tools: ToolPlan | None = None,
    ) -> Run:
        if body.min_tokens and body.token_limit() is not None and body.min_tokens > (body.token_limit() or 0):
            raise invalid_request("min_tokens must not exceed max_tokens", param="min_tokens")
        requests: list[GenerationRequest] = []
        for prompt in prompts:
            request = self._generation(served, body, prompt, body.token_limit(), guide, logprobs)
            requests += self._fan_out(request, body.n)
        return Run(
            self.engine,
            self.metrics,
            served.tokenizer,
            shape(served.name, len(requests)),
            prompts,
            requests,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            echo=echo,
            logprobs=logprobs,
            tools=tools,
        )

    async def chat(self, body: ChatCompletionRequest) -> bytes | AsyncIterator[bytes]:
        for name in UNSUPPORTED_CHAT_FIELDS:
            if (body.model_extra or {}).get(name) is not None:
                raise invalid_request(f"{name} is not supported by this server", param=name)
        served = self.served(body.model)
        tools = plan(body)
        guide = response_guide(body.response_format)
        if tools is not None:
            if guide is not None and tools.mode == "auto":
                raise invalid_request(
                    "response_format json_object/json_schema with tool_choice 'auto' is not supported: "
                    "use tool_choice 'required' or a named function for calls, or leave out tools",
                    param="response_format",
                )
            if body.logprobs:
                raise invalid_request("logprobs cannot be combined with tools on this server", param="logprobs")
            guide = tools.guide() or guide
        tokenizer = served.tokenizer
        variables = render_messages(body.messages, tools, native=tokenizer.takes_tools)
        prompt = Prompt(tokenizer.chat_prompt(variables["messages"], variables.get("tools")), tokenizer)
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = self._run(served, ChatShape, body, [prompt], guide=guide, logprobs=top, tools=tools)
        return await run.answer()

    async def completion(self, body: CompletionRequest) -> bytes | AsyncIterator[bytes]:
        if body.suffix:
            raise invalid_request("suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise invalid_request("best_of is not supported by this server", param="best_of")
        served = self.served(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise invalid_request("prompt must not be empty", param="prompt")
        if len(texts) > 1 and body.stream:
            raise invalid_request("streaming supports one prompt per request", param="prompt")
        prompts = [Prompt(text, served.tokenizer) for text in texts]
        guide = response_guide(body.response_format)
        run = self._run(served, CompletionShape, body, prompts, echo=body.echo, guide=guide, logprobs=body.logprobs)
        return await run.answer()
