"""The validate stage: a Chat Completions, Completions or Responses request → a `Plan` (what the pipeline runs),
with every cheap refusal made here, before any work: unknown model (404), parameters the engine refuses, too
many images, unknown experts, images for a model that cannot see them, a prompt that leaves no room (400)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from concurrent.futures import Executor
from typing import Any

from server.api.errors import APIError, bad_request
from server.api.pipeline import EngineClient, Plan, Prompt, engine_validate
from server.api.prompting import ChatInput, PromptBuilder, parse_messages
from server.api.responses import ResponsesRequest, ResponseStore, conversation
from server.api.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.api.tools import Tool, ToolSet
from server.engine.types import GenerateRequest, GrammarSpec, SamplingParams
from server.settings import Settings


class Planner:
    def __init__(self, settings: Settings, engine: EngineClient, builder: PromptBuilder,
                 experts: Any | None = None, executor: Executor | None = None):
        self.settings, self.engine, self.builder, self.experts, self.executor = (
            settings, engine, builder, experts, executor)
        loaded = engine.loaded
        self.multimodal = bool(getattr(loaded.model, "multimodal", False))
        self.plain_id = settings.served_model_name or loaded.name
        self.vocab_size = int(getattr(engine.tokenizer, "vocab_size", 0) or 0)

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.engine.adapters  # changes while serving when adapters load at run time

    @property
    def model_ids(self) -> tuple[str, ...]:
        return self.adapters or (self.plain_id,)

    # ---------------------------------------------------------------------------------- shared checks
    def resolve_model(self, model: str) -> str | None:
        """The adapter a model id names (None for a plain model); 404 for an unknown id."""
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.model_ids)}",
                           param="model", code="model_not_found")
        return model if self.adapters else None

    def check_ids(self, ids, param: str, what: str) -> None:
        """A 400 naming `param` unless every token id is in the vocabulary."""
        bad = next((t for t in ids if t < 0 or (self.vocab_size and t >= self.vocab_size)), None)
        if bad is not None:
            raise bad_request(f"{what} {bad} is outside the vocabulary (0..{self.vocab_size - 1})", param)

    async def encode(self, text: str) -> list[int]:
        if len(text) < 8192:
            return self.builder.encode(text)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.builder.encode, text)

    def sampling(self, req: Any, *, logprobs: bool, top: int, grammar: GrammarSpec | None) -> SamplingParams:
        """The engine's sampling parameters from the fields every request shape shares (missing ones: off)."""
        def get(name: str, default: Any = None) -> Any:
            value = getattr(req, name, None)
            return default if value is None else value

        bias = {int(key): float(value) for key, value in get("logit_bias", {}).items()}
        self.check_ids(bias, "logit_bias", "logit_bias token id")
        self.check_ids(get("stop_token_ids", ()), "stop_token_ids", "stop_token_ids: token id")
        seed = get("seed")
        return SamplingParams(
            max_tokens=1,  # set once the prompt is final
            temperature=get("temperature", 1.0), top_p=get("top_p", 1.0), top_k=max(0, get("top_k", 0)),
            min_p=get("min_p", 0.0), repetition_penalty=get("repetition_penalty", 1.0),
            frequency_penalty=get("frequency_penalty", 0.0), presence_penalty=get("presence_penalty", 0.0),
            logit_bias=bias, seed=None if seed is None else seed % 2**63, stop=getattr(req, "stop_list", ()),
            stop_token_ids=tuple(get("stop_token_ids", ())), min_tokens=get("min_tokens", 0),
            ignore_eos=get("ignore_eos", False), include_stop_str_in_output=get("include_stop_str_in_output", False),
            grammar=grammar, n=get("n", 1), logprobs=logprobs, top_logprobs=top,
        )

    async def check_length(self, plan: Plan) -> None:
        """ContextLengthError (→ 400 with the numbers) or a 400 for a parameter the engine refuses, unless each
        prompt + the tokens asked for fit. A grammar is compiled here (off the event loop: a large schema takes
        a while), so a bad one is a 400 before admission and the engine gets it from the compiled cache."""
        loop = asyncio.get_running_loop()
        for k, prompt in enumerate(plan.prompts):
            request = GenerateRequest(
                request_id=f"check-{k}", prompt_ids=prompt.ids, adapter=plan.adapter,
                sampling=dataclasses.replace(plan.sampling, max_tokens=max(1, plan.max_tokens or 1)))
            if plan.sampling.grammar is None:
                engine_validate(self.engine, request)
            else:
                await loop.run_in_executor(self.executor, engine_validate, self.engine, request)

    def expert_names(self, requested: list[str] | None, chat: ChatInput, model: str) -> tuple[str, ...]:
        urls = chat.image_urls
        if len(urls) > self.settings.max_images:
            raise bad_request(f"{len(urls)} images in this request; the limit is {self.settings.max_images}",
                              "messages", "too_many_images")
        names: tuple[str, ...] = ()
        if requested and self.experts is None:
            raise APIError(400, f"unknown or disabled expert(s) {requested}; no experts are enabled",
                           param="experts", code="unknown_expert")
        if self.experts is not None:
            names = tuple(self.experts.resolve(requested))  # UnknownExpertError → 400
        if urls and not self.multimodal and not names:
            raise bad_request(
                f"the model {model!r} cannot see images and no experts are enabled to describe them; "
                "enable experts (`experts` or --experts) or send text only", "messages", "images_unsupported")
        return names if urls else ()

    async def plan_chat_input(self, chat: ChatInput, *, kind: str, model: str, adapter: str | None,
                              sampling: SamplingParams, max_tokens: int | None, tools: ToolSet | None,
                              experts: list[str] | None, stream: bool, include_usage: bool = False,
                              user: str | None = None, extra: dict | None = None) -> Plan:
        """A Plan for a conversation (chat and responses share it)."""
        names = self.expert_names(experts, chat, model)
        ids = await self.encode(self.builder.render(chat, None, tools))
        plan = Plan(kind=kind, model=model, adapter=adapter, sampling=sampling, prompts=(Prompt(tuple(ids)),),
                    max_tokens=max_tokens, chat=chat, expert_names=names, tools=tools, stream=stream,
                    include_usage=include_usage, user=user, extra=extra or {})
        await self.check_length(plan)
        return plan

    # --------------------------------------------------------------------------------- per shape
    async def chat(self, req: ChatCompletionRequest) -> Plan:
        adapter = self.resolve_model(req.model)
        tools, grammar = tools_and_grammar(req)
        return await self.plan_chat_input(
            parse_messages(req.messages), kind="chat", model=req.model, adapter=adapter,
            sampling=self.sampling(req, logprobs=req.logprobs, top=req.top_logprobs or 0, grammar=grammar),
            max_tokens=req.max_new_tokens, tools=tools, experts=req.experts, stream=req.stream,
            include_usage=req.include_usage, user=req.user)

    async def completion(self, req: CompletionRequest) -> Plan:
        adapter = self.resolve_model(req.model)
        batch = isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str | list)
        prompts = []
        for i, prompt in enumerate(req.prompt if batch else [req.prompt]):
            param = f"prompt[{i}]" if batch and len(req.prompt) > 1 else "prompt"
            if isinstance(prompt, str):
                ids, echo = await self.encode(prompt), prompt
            else:
                ids = [int(t) for t in prompt]
                self.check_ids(ids, param, "prompt token id")
                echo = self.engine.tokenizer.decode(ids)
            if not ids:
                raise bad_request("prompt must not be empty", param)
            prompts.append(Prompt(tuple(ids), echo if req.echo else ""))
        sampling = self.sampling(req, logprobs=req.logprobs is not None, top=req.logprobs or 0, grammar=req.grammar)
        plan = Plan(kind="completion", model=req.model, adapter=adapter, sampling=sampling, prompts=tuple(prompts),
                    max_tokens=req.max_tokens, stream=req.stream, include_usage=req.include_usage, user=req.user)
        await self.check_length(plan)
        return plan

    async def responses(self, req: ResponsesRequest, store: ResponseStore) -> Plan:
        adapter = self.resolve_model(req.model)
        tools, grammar = tools_and_grammar(req)
        chat, carried = conversation(req, store)
        choice = req.tool_choice or "auto"
        echo = {
            "instructions": req.instructions, "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": req.previous_response_id,
            "store": req.store is not False and store.size > 0, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)
                     if req.text is not None and req.text.format is not None else {"type": "text"}},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [{**t.model_dump(exclude_none=True), "parameters": json.loads(t.parameters_json),
                       "strict": bool(t.strict)} for t in req.tools or ()],
            "carried": carried,
        }
        return await self.plan_chat_input(
            chat, kind="responses", model=req.model, adapter=adapter,
            sampling=self.sampling(req, logprobs=False, top=0, grammar=grammar), max_tokens=req.max_output_tokens,
            tools=tools, experts=req.experts, stream=req.stream, user=req.user, extra=echo)

    # ---------------------------------------------------------------------------------- tokenizer
    async def tokenize(self, req: TokenizeRequest) -> dict:
        """The ids a completion (`prompt`) or a chat request (`messages`, through the template) would send."""
        if req.model is not None:
            self.resolve_model(req.model)
        if req.messages is not None:
            ids = await self.encode(self.builder.render(parse_messages(req.messages), None))
        elif req.add_special_tokens:
            ids = await self.encode(req.prompt)
        else:
            ids = self.engine.tokenizer.encode(req.prompt, bos=False)
        body = {"count": len(ids), "max_model_len": self.engine.max_context, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [self.engine.tokenizer.token_text(i) for i in ids]
        return body

    def detokenize(self, req: DetokenizeRequest) -> dict:
        if req.model is not None:
            self.resolve_model(req.model)
        self.check_ids(req.tokens, "tokens", "token id")
        return {"prompt": self.engine.tokenizer.decode(req.tokens)}


def tools_and_grammar(req: ChatCompletionRequest | ResponsesRequest) -> tuple[ToolSet | None, GrammarSpec | None]:
    """The request's ToolSet and what constrains its reply: the tools' grammar (which takes in a JSON answer
    format), else the response format's."""
    tools = tool_set(req.tools, req.tool_choice, req.parallel_tool_calls, req.grammar)
    return tools, tools.grammar() if tools is not None and tools.active else req.grammar


def tool_set(tools: list | None, choice: Any, parallel: bool | None, answer: GrammarSpec | None) -> ToolSet | None:
    """The request's tools (already validated by the schema) as a ToolSet; None without tools."""
    if not tools:
        return None
    named = None
    if choice is None:
        choice = "auto"
    elif not isinstance(choice, str):
        choice, named = "function", choice.name
    if answer is not None and choice != "none":
        if choice != "auto" or answer.kind not in ("json_schema", "json_object"):
            raise bad_request("tool_choice 'required' or a named function leaves no text answer to constrain: "
                              "drop response_format / structured_outputs, or use tool_choice 'auto'"
                              if choice != "auto" else
                              "with tools, the text answer can only be constrained by a JSON schema or json_object",
                              "response_format")
    return ToolSet(tuple(Tool(t.name, t.description, t.parameters_json) for t in tools), choice, named,
                   parallel is not False, answer if choice == "auto" else None)
