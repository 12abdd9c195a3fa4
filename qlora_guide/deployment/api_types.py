"""The request and response bodies of the OpenAI-compatible server, as pydantic models.

Requests are validated strictly (``"8"`` is not an integer, ``true`` is not a
number), the way the OpenAI API does. A validator that refuses a value raises
a ``PydanticCustomError`` whose type is the OpenAI error code
(``invalid_type``, ``invalid_value``, ``invalid_content``,
``unsupported_parameter``); :mod:`~qlora_guide.deployment.api_errors` turns
any validation error into OpenAI's error body. Limits that depend on the
served model (``max_tokens``, the context, the number of stop strings) are
checked by the server, not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from pydantic_core import PydanticCustomError

# Options this server does not implement, and the values that mean "not used": anything else is refused.
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "logprobs": lambda v: v is False or (isinstance(v, int) and not isinstance(v, bool) and v == 0),
    "top_logprobs": lambda v: v == 0,
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logit_bias": lambda v: v == {},
    "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text",
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": lambda v: v == 1,
}


def type_name(value: Any) -> str:
    """How an error message names the JSON type of ``value``."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _unsupported(name: str, value: Any) -> Any:
    """``value``, unless it asks for an option this server does not implement."""
    if value is not None and not UNSUPPORTED_DEFAULTS[name](value):
        raise PydanticCustomError("unsupported_parameter", "'{name}' is not supported by this server", {"name": name})
    return value


# ------------------------------------------------------------------ requests


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is used."""

    model_config = ConfigDict(strict=True, extra="allow")

    include_usage: bool | None = None


class ChatMessage(BaseModel):
    """One message of a conversation; ``content`` is text, or an array of text parts."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = Field(None, validate_default=True)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> str:
        """The content as one string: a string, or the text parts of an array joined."""
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise PydanticCustomError("invalid_content", "only text parts are supported")
            return "".join(p["text"] for p in content)
        raise PydanticCustomError(
            "invalid_type", "must be a string or an array of text parts, not {kind}", {"kind": type_name(content)}
        )

    def as_template_message(self) -> dict[str, str]:
        """The ``{role, content}`` a chat template takes (``developer`` becomes ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class GenerationRequest(BaseModel):
    """What both completion endpoints share: the model, the limits, sampling, streaming, stops."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: Any = Field(None, validate_default=True)
    logprobs: Any = None
    top_logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    functions: Any = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        """Only one choice per request."""
        if n is not None and n != 1:
            raise PydanticCustomError("invalid_value", "'n' must be 1: this server returns one choice, not {n}", {"n": n})
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any) -> list[str]:
        """``stop`` as a list of non-empty strings (a single string is a list of one)."""
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise PydanticCustomError("invalid_type", "'stop' must be a string or an array of strings")
        return [s for s in stops if s]

    @field_validator(
        "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
        "tools", "functions", mode="before",
    )
    @classmethod
    def _not_implemented(cls, value: Any, info: Any) -> Any:
        """Refuse options this server does not implement, rather than silently ignoring them."""
        return _unsupported(info.field_name, value)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def token_limit(self) -> tuple[str, int | None]:
        """The name and value of the request's answer length (``max_tokens``)."""
        return "max_tokens", self.max_tokens


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def token_limit(self) -> tuple[str, int | None]:
        """``max_completion_tokens`` when given (the newer name), else ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a batch of one, or token ids."""

    prompt: Any
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("echo", "suffix", "best_of", mode="before")
    @classmethod
    def _not_implemented_here(cls, value: Any, info: Any) -> Any:
        """Refuse the completion options this server does not implement."""
        return _unsupported(info.field_name, value)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        """The prompt as a non-empty string or a non-empty list of token ids (a batch of one is unwrapped)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise PydanticCustomError("invalid_value", "'prompt' must not be empty")
            return prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise PydanticCustomError(
            "invalid_type",
            "'prompt' must be a string, an array of one string, or an array of token ids (batches are not supported)",
        )


# ------------------------------------------------------------------ responses


class Usage(BaseModel):
    """Token counts of one answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """The usage of an answer of ``completion_tokens`` to a prompt of ``prompt_tokens``."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class AssistantMessage(BaseModel):
    """The answer of a chat completion."""

    role: Literal["assistant"] = "assistant"
    content: str


class Delta(BaseModel):
    """What one streamed chat chunk adds; fields that are not set are left out of the JSON."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out the fields that are None, as OpenAI's chunks do."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChoice(BaseModel):
    """The one choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None


class ChatChunkChoice(BaseModel):
    """The one choice of a streamed chat chunk."""

    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: str | None = None


class TextChoice(BaseModel):
    """The one choice of a text completion (whole, or one streamed chunk)."""

    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class ResponseBase(BaseModel):
    """What every completion response and chunk carries."""

    id: str
    object: str
    created: int
    model: str
    usage: Usage | None = None

    def to_json(self) -> str:
        """The JSON of this response; ``usage`` is left out when there is none (streamed chunks)."""
        return self.model_dump_json(exclude={"usage"} if self.usage is None else None)


class ChatCompletion(ResponseBase):
    """A whole chat completion (``object``: ``chat.completion``)."""

    choices: list[ChatChoice]


class ChatCompletionChunk(ResponseBase):
    """One server-sent event of a streamed chat completion (``object``: ``chat.completion.chunk``)."""

    choices: list[ChatChunkChoice]


class TextCompletion(ResponseBase):
    """A text completion, whole or one streamed chunk (``object``: ``text_completion``)."""

    choices: list[TextChoice]


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qlora-guide"


class ModelList(BaseModel):
    """``GET /v1/models``: the one model served."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """``GET /health``: liveness, the model, and how many requests wait."""

    status: Literal["ok"] = "ok"
    model: str
    waiting: int
    busy: bool


class ErrorDetail(BaseModel):
    """The inside of OpenAI's error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
