"""Wire types: the OpenAI Chat Completions / Completions subset we serve (tools included), vLLM's tokenizer and
adapter endpoints, plus our extensions (the Responses API's types are in server/api/responses.py).

Every parameter is either honoured or refused with a 400 that names it: unknown fields are forbidden, and the
OpenAI parameters this server does not implement (audio, the deprecated functions, ...) are accepted only with
their "off" value. Extensions, as extra body fields: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, vLLM's `min_tokens`,
`stop_token_ids` and `include_stop_str_in_output`, and
`experts` (which experts to run on the images; [] = none). Response models exist for the OpenAPI docs;
the service builds plain dicts.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, WithJsonSchema, field_validator, model_validator

from server.engine.types import GrammarSpec

# parameter → values that mean "not used"; anything else is refused by name
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "web_search_options": (None,),
    "verbosity": (None,),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}


class ParamError(ValueError):
    """A cross-field refusal that names the parameter at fault (pydantic would blame the whole body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _unsupported(name: str, value: Any) -> Any:
    if value in UNSUPPORTED[name]:
        return None
    raise ValueError(f"'{name}' is not supported by this server (it has no such feature); omit it")


# Documented as null (what clients should send); the validators also accept each parameter's "off" value.
Off = Annotated[Any, WithJsonSchema({"type": "null", "description": "not supported: omit or null"})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


GRAMMAR_CHARS = 65_536  # a schema, regex or grammar in a request (compiling one costs time: bounded)

# --------------------------------------------------------------------------------------------- messages


class ImageURL(_Strict):
    url: str = Field(..., description="https://… or data:image/png;base64,…")
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="all three are the same here: every image is encoded at the model's resolution")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart | RefusalPart, Field(discriminator="type")]


TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionCall(_Strict):
    name: str = Field(..., pattern=TOOL_NAME)
    arguments: str = Field(..., max_length=GRAMMAR_CHARS, description="JSON text")


class ToolCallParam(_Strict):
    """A tool call of an earlier assistant message, as the API returned it."""

    id: str = Field(..., min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallParam] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=128, description="tool messages: the call this answers")
    function_call: Off = None

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: Any) -> Any:
        if value == "function":
            raise ValueError("'function' messages (the deprecated functions API) are not supported: use tools and "
                             "'tool' messages")
        return value

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ParamError("tool_calls", "only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ParamError("tool_call_id", "a tool message needs the tool_call_id it answers (and only tool "
                             "messages have one)")
        return self

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """Clear messages for the shapes clients get wrong (pydantic's union errors are unreadable)."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of content parts")
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise ValueError(f"part {i} must be an object with a 'type'")
            kind = part.get("type")
            if kind not in ("text", "image_url", "refusal"):
                raise ValueError(f"part {i} has type {kind!r}; supported part types: 'text', 'image_url', "
                                 "'refusal' (assistant messages)")
            if kind == "image_url" and isinstance(part.get("image_url"), str):
                raise ValueError(f"part {i}: image_url must be an object {{\"url\": ...}}, not a string")
        return value

    @field_validator("function_call")
    @classmethod
    def _no_functions(cls, value: Any) -> Any:
        if value not in (None, []):
            raise ValueError("function_call (the deprecated functions API) is not supported: use tool_calls")
        return None

    @model_validator(mode="after")
    def _refusals_from_assistants(self) -> ChatMessage:
        if self.role != "assistant" and isinstance(self.content, list):
            if any(isinstance(p, RefusalPart) for p in self.content):
                raise ParamError("content", f"refusal parts belong to assistant messages, not {self.role} messages")
        return self

    @model_validator(mode="after")
    def _images_from_users(self) -> ChatMessage:
        if self.role != "user" and isinstance(self.content, list):
            if any(isinstance(p, ImagePart) for p in self.content):
                raise ParamError("content", f"only user messages may contain images, not {self.role} messages")
        return self


# ------------------------------------------------------------------------------------------- requests


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool = Field(
        True, description="accepted (openai-python 2.x sends it); no obfuscation padding is added here")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: text, json_object (any JSON object) or json_schema (output valid against it;
    with or without strict, the output is constrained to the schema)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type 'json_schema', and only there")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one of choice, regex, json (a schema), grammar (Lark or GBNF),
    json_object."""

    model_config = ConfigDict(extra="forbid")
    choice: list[Annotated[str, Field(min_length=1, max_length=1024)]] | None = Field(None, min_length=1, max_length=256)
    regex: str | None = Field(None, min_length=1, max_length=GRAMMAR_CHARS)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    grammar: str | None = Field(None, min_length=1, max_length=GRAMMAR_CHARS)
    json_object: bool | None = None

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        given = [k for k in ("choice", "regex", "json_", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of choice, regex, json, grammar, json_object")
        return self


def _schema(schema: dict[str, Any] | str, param: str) -> GrammarSpec:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    if len(text) > GRAMMAR_CHARS:
        raise ParamError(param, f"the schema is over {GRAMMAR_CHARS} characters")
    return GrammarSpec("json_schema", text)


def _grammar_spec(fmt: ResponseFormat | None, so: StructuredOutputs | None) -> GrammarSpec | None:
    if fmt is not None and fmt.type != "text" and so is not None:
        raise ParamError("structured_outputs", "response_format and structured_outputs both constrain the output: "
                         "send one")
    if fmt is not None and fmt.type == "json_object":
        return GrammarSpec("json_object")
    if fmt is not None and fmt.type == "json_schema":
        return _schema(fmt.json_schema.schema_, "response_format")
    if so is None:
        return None
    if so.choice is not None:
        return GrammarSpec("choice", json.dumps(so.choice))
    if so.regex is not None:
        return GrammarSpec("regex", so.regex)
    if so.grammar is not None:
        return GrammarSpec("grammar", so.grammar)
    if so.json_ is not None:
        return _schema(so.json_, "structured_outputs")
    return GrammarSpec("json_object")


class FunctionDefinition(_Strict):
    name: str = Field(..., pattern=TOOL_NAME)
    description: str | None = Field(None, max_length=GRAMMAR_CHARS)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description="a JSON schema; the call's arguments always validate against it")
    strict: bool | None = Field(None, description="accepted: the arguments are always constrained to the schema")


class ToolParam(_Strict):
    type: Literal["function"]
    function: FunctionDefinition

    @property
    def name(self) -> str:
        return self.function.name

    @property
    def description(self) -> str | None:
        return self.function.description

    @property
    def parameters_json(self) -> str:
        return json.dumps(self.function.parameters)


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName

    @property
    def name(self) -> str:
        return self.function.name


def check_tools(tools: list | None, choice: Any) -> None:
    """Tool names unique, schemas bounded, a named or required tool_choice with tools to choose from."""
    names = [t.name for t in tools or ()]
    if len(set(names)) != len(names):
        raise ParamError("tools", "tool names must be unique")
    if sum(len(t.parameters_json) for t in tools or ()) > GRAMMAR_CHARS:
        raise ParamError("tools", f"the tools' schemas are over {GRAMMAR_CHARS} characters together")
    if choice is not None and choice not in ("none", "auto") and not tools:
        raise ParamError("tool_choice", "tool_choice 'required' or a named function needs tools")
    named = getattr(choice, "name", None)
    if named is not None and named not in names:
        raise ParamError("tool_choice", f"tool_choice names {named!r}, which is not among the tools")


StopParam = Annotated[str | Annotated[list[str], Field(min_length=0, max_length=4)] | None, Field(
    None, description="up to 4 sequences; the returned text does not contain them")]


class _Sampling(_Strict):
    """Parameters both endpoints share."""

    model: str = Field(..., min_length=1, description="a model id from GET /v1/models")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="choices")
    stop: StopParam = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) → bias in [-100, 100]")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=512, description="recorded in the server's logs")
    # extensions
    top_k: int | None = Field(None, ge=-1, description="extension; 0 or -1 = off")
    min_p: float | None = Field(None, ge=0, le=1, description="extension")
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="extension; 1 = off")
    ignore_eos: bool = Field(False, description="extension: generate max tokens even past end-of-sequence")
    min_tokens: int = Field(0, ge=0, description="extension (vLLM's): no stop token or stop string before this many")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension (vLLM's): ids that end a choice")
    include_stop_str_in_output: bool = Field(
        False, description="extension (vLLM's): the stop string (or stop_token_ids token) that ended a choice stays "
        "at the end of its text")
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the output is constrained to it (text: no constraint)")
    structured_outputs: StructuredOutputs | None = Field(
        None, description="extension (vLLM's): constrain the output to a choice, regex, JSON schema or grammar")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.strip().isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
        return value

    @model_validator(mode="after")
    def _stream_options(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed with stream: true")
        return self

    _grammar: GrammarSpec | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _structured(self) -> _Sampling:
        self._grammar = _grammar_spec(self.response_format, self.structured_outputs)  # refusals at parse time
        return self

    @model_validator(mode="after")
    def _min_tokens(self) -> _Sampling:
        limit = getattr(self, "max_new_tokens", getattr(self, "max_tokens", None))  # chat | completions
        if limit is not None and self.min_tokens > limit:
            raise ParamError("min_tokens", f"min_tokens ({self.min_tokens}) is more than max_tokens ({limit})")
        return self

    @property
    def grammar(self) -> GrammarSpec | None:
        return self._grammar

    @property
    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    experts: list[str] | None = Field(
        None, description="extension: experts to run on the images (default: the server's set; [] = none)")
    tools: list[ToolParam] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools; the calls are constrained to the functions' schemas")
    parallel_tool_calls: bool | None = Field(None, description="default true: several calls in one reply")
    # OpenAI parameters without an implementation here: only their "off" values are accepted
    functions: Off = None
    function_call: Off = None
    audio: Off = None
    modalities: Off = None
    prediction: Off = None
    reasoning_effort: Off = None
    service_tier: Off = None
    store: Off = None
    metadata: Off = None
    web_search_options: Off = None
    verbosity: Off = None
    prompt_cache_key: Off = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(
        None, description="accepted; prefix caching here is automatic and in memory")
    safety_identifier: Off = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _off(cls, value: Any, info) -> Any:
        return _unsupported(info.field_name, value)

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        check_tools(self.tools, self.tool_choice)
        return self

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ParamError("max_completion_tokens",
                             "max_tokens and max_completion_tokens disagree; send only max_completion_tokens")
        if self.top_logprobs is not None and self.top_logprobs > 0 and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


MAX_PROMPTS = 64  # prompts in one /v1/completions request (each takes a waiting-queue place)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a string or token ids, or a batch of them (one choice per prompt and n, in that order)")
    max_tokens: int | None = Field(16, ge=1, description="null = the rest of the context")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16, description="only equal to n (no server-side ranking)")
    suffix: str | None = Field(None, description="not supported: must be null")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        if isinstance(value, list) and isinstance(value[0], str | list) and len(value) > MAX_PROMPTS:
            raise ValueError(f"{len(value)} prompts in one request; the limit is {MAX_PROMPTS}")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> None:
        if value:
            raise ValueError("'suffix' (insertion) is not supported by this server")
        return None

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ParamError("logprobs", "logprobs of the echoed prompt are not supported; drop echo or logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of", "best_of other than n is not supported (no server-side ranking)")
        return self


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="with `prompt`: prepend BOS as a completion would")
    add_generation_prompt: bool = Field(True, description="with `messages`: only true (the prompt a chat sends)")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "send exactly one of `prompt` and `messages`")
        if self.messages is not None and not self.add_generation_prompt:
            raise ParamError("add_generation_prompt", "only true is supported (the prompt a chat request sends)")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(..., description="token ids")


class LoadAdapterRequest(_Strict):
    """vLLM's /v1/load_lora_adapter: a LLaMA-Adapter V2 file served as `lora_name` from now on."""

    lora_name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", description="the model id clients send")
    lora_path: str = Field(..., min_length=1, max_length=4096, description="the .pth file (inside --adapter-dir)")


class UnloadAdapterRequest(_Strict):
    lora_name: str = Field(..., min_length=1, max_length=128)
    lora_int_id: int | None = Field(None, description="accepted (vLLM's); adapters are named here")


# ------------------------------------------------------------------------------ responses (for the docs)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens reused from the prefix cache (not recomputed)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ExpertReport(BaseModel):
    name: str
    text: str
    seconds: float
    status: str
    error: str | None = None
    image: int = Field(..., description="index of the image among the request's images")
    data: list[dict] = Field(default_factory=list, description="structured findings: boxes, scores, OCR lines")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the reply is only tool calls")
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    experts: list[ExpertReport] | None = Field(None, description="extension: what each expert saw")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int = Field(description="tokens per sequence, prompt and completion together")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
