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

from gateway.admission import Admission, shutting_down
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
from gateway.shutdown import Shutdown
from gateway.structured import response_guide
from gateway.tokenizer import ChatTokenizer
from gateway.tools import ToolPlan, plan, render_messages

_UINT64 = (1 << 64) - 1
_INT32 = (1 << 31) - 1
# Below these, float32 engines see 0 or overflow: the request means greedy decoding.
_COLDEST = 1e-5
_NARROWEST = 1e-6


@dataclass
class ServedModel:
    name: str
    settings: ModelSettings
    tokenizer: ChatTokenizer
    admission: Admission
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
        self.shutdown = Shutdown()
        self.models = {
            name: ServedModel(name, model, tokenizers[name], Admission(name, model.limits, self.metrics))
            for name, model in settings.models.items()
        }

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

    @property
    def draining(self) -> bool:
        return self.shutdown.draining

    def drain(self) -> None:
        """Shutdown has begun (gateway.shutdown): queued and new requests get a 503; running
        ones go on until the grace is over."""
        self.shutdown.draining = True
        for served in self.models.values():
            served.admission.close()

    def in_flight(self) -> int:
        return sum(served.admission.used for served in self.models.values())

    # ------------------------------------------------------------------ requests

    async def _generation(
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
        # The cheap bounds settle almost every request; only a near miss is tokenized.
        if context is not None and prompt.at_most() + max_tokens > context:
            # A prompt that cannot fit whatever its tokens are is refused without tokenizing it.
            exact = prompt.at_least() < context
            prompt_tokens = await prompt.count() if exact else prompt.at_least()
            room = context - prompt_tokens
            if prompt_tokens + max_tokens > context and (limit is not None or room < 1):
                at_least = "" if exact else "at least "
                raise invalid_request(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{at_least}{prompt_tokens + max_tokens} tokens ({at_least}{prompt_tokens} in the messages, "
                    f"{max_tokens} in the completion). Please reduce the length of the messages or completion.",
                    param="messages" if room < 1 else "max_tokens",
                    code="context_length_exceeded",
                )
            max_tokens = min(max_tokens, room)  # no explicit limit asked: fill what the context leaves
        temperature = body.temperature if body.temperature is not None else defaults.temperature
        if temperature is not None and temperature < _COLDEST:
            temperature = 0.0  # colder is greedy anyway, and in float32 it overflows the logits
        top_k = defaults.top_k if body.top_k is None else body.top_k
        if top_k is not None and (top_k <= 0 or top_k > _INT32):
            # 0 and -1 both mean "no top-k" (engines disagree on which, so send neither); so
            # does a k larger than any vocabulary.
            top_k = None
        top_p = body.top_p if body.top_p is not None else defaults.top_p
        if top_p is not None and top_p < _NARROWEST:  # OpenAI clients sometimes send 0 for "most likely only"
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

    def _check_work(self, served: ServedModel, body: SamplingFields, prompts: int) -> None:
        """Work one request may ask for (before anything is tokenized): a 400 naming the field."""
        limits = served.settings.limits
        if prompts > limits.max_prompts:
            raise invalid_request(
                f"prompt: at most {limits.max_prompts} prompts per request on this server, got {prompts}",
                param="prompt",
            )
        if body.n > limits.max_n:
            raise invalid_request(f"n: at most {limits.max_n} on this server, got {body.n}", param="n")

    def _check_tokens(self, served: ServedModel, body: SamplingFields, requests: list[GenerationRequest]) -> None:
        """prompts × n × max_tokens, once the context check has settled each max_tokens."""
        allowed = served.settings.limits.max_requested_tokens
        requested = sum(r.max_tokens for r in requests)
        if requested > allowed:
            name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            raise invalid_request(
                f"{name}: this request asks for up to {requested} tokens in all ({len(requests)} "
                f"completion(s) of up to {requests[0].max_tokens}); this server allows {allowed} per request",
                param=name,
            )

    async def _run(
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
        self._check_work(served, body, len(prompts))
        if self.draining:
            raise shutting_down()
        requests: list[GenerationRequest] = []
        for prompt in prompts:
            request = await self._generation(served, body, prompt, body.token_limit(), guide, logprobs)
            requests += self._fan_out(request, body.n)
        self._check_tokens(served, body, requests)
        return Run(
            self.engine,
            self.metrics,
            served.admission,
            served.tokenizer,
            shape(served.name, len(requests)),
            prompts,
            requests,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            echo=echo,
            logprobs=logprobs,
            tools=tools,
            shutdown=self.shutdown,
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
        prompt = Prompt(await tokenizer.chat_prompt_off_loop(variables["messages"], variables.get("tools")), tokenizer)
        top = (body.top_logprobs or 0) if body.logprobs else None
        run = await self._run(served, ChatShape, body, [prompt], guide=guide, logprobs=top, tools=tools)
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
        for i, text in enumerate(texts):
            if not text:  # the engines have nothing to start from
                where = "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]"
                raise invalid_request(f"{where} must not be empty", param=where)
        if len(texts) > 1 and body.stream:
            raise invalid_request("streaming supports one prompt per request", param="prompt")
        prompts = [Prompt(text, served.tokenizer) for text in texts]
        guide = response_guide(body.response_format)
        run = await self._run(
            served, CompletionShape, body, prompts, echo=body.echo, guide=guide, logprobs=body.logprobs
        )
        return await run.answer()
