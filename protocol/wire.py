"""The OpenAI wire models sharpen validates and builds.

Requests are validated strictly where sharpen relies on a field and leniently elsewhere: unknown
fields (vLLM's extras such as ``top_k``, ``structured_outputs``, ``cache_salt``) are kept and
passed upstream untouched. sharpen's own fields (``strategy``, ``trace``, ``memory``) are removed
before anything goes upstream.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import InvalidRequest

# Fields that belong to sharpen, never forwarded upstream.
SHARPEN_FIELDS = ("strategy", "trace", "memory")


class ChatMessage(BaseModel):
    """One message; content may be text or a list of content parts."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


def text_of(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: list-valued content (content parts) joined as text, never a list repr."""
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("text"))
    return content or ""


def task_of(messages: list[dict[str, Any]]) -> str:
    """What a conversation asks: its last user message's text (the task an experience is about,
    the question an adapter learns from and is routed by)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return text_of(m.get("content"))
    return ""


class _Sampling(BaseModel):
    """The sampling fields both endpoints share and sharpen reads. Strict: the body is forwarded
    as sent, so a value sharpen would coerce (``"n": "2"``, ``"stream": "yes"``) would reach the
    upstream as the string it was; it is refused instead."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, strict=True)
    stream: bool = Field(default=False, strict=True)
    n: int | None = Field(default=None, ge=1, le=256, strict=True)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    seed: int | None = Field(default=None, strict=True)
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    response_format: dict[str, Any] | None = None
    # sharpen's own
    strategy: str | dict[str, Any] | None = None
    trace: bool = Field(default=False, strict=True)
    memory: bool | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)
    strategy: str | dict[str, Any] | None = None


def parse_json(raw: bytes) -> Any:
    """A request body's JSON; malformed JSON is a 400 (the one place that says so)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.") from None


M = TypeVar("M", bound=BaseModel)


def first_problem(exc: ValidationError) -> tuple[str, str, str]:
    """The dotted location, message and kind of a pydantic error's first problem (the one place
    that reads pydantic errors; callers word the 400)."""
    err = exc.errors(include_url=False)[0]
    return ".".join(str(p) for p in err["loc"]), str(err["msg"]), str(err["type"])


# Deeper bodies are refused: the JSON parser takes 1,024 levels but the encoder that forwards
# a body upstream only 254, and nothing in the OpenAI API nests more than a few levels.
MAX_DEPTH = 64


def too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` nests lists and objects more than ``limit`` levels (iteratively: a deep
    body must not exhaust the stack here either)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        children = o.values() if isinstance(o, dict) else o
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def validate(model: type[M], body: Any) -> M:
    """Validates ``body`` against ``model``; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if too_deep(body):
        raise InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        loc, msg, kind = first_problem(exc)
        msg = "is required" if kind == "missing" else msg
        raise InvalidRequest(f"Invalid request: '{loc}' {msg}.", param=loc or None) from None


class Usage(BaseModel):
    """Token accounting, summed over every upstream call a request made."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: dict[str, Any] | Usage | None) -> None:
        if other is None:
            return
        if isinstance(other, Usage):  # every upstream call adds one: no model_dump on the way
            prompt, completion = other.prompt_tokens, other.completion_tokens
        else:
            prompt, completion = int(other.get("prompt_tokens") or 0), int(other.get("completion_tokens") or 0)
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = "stop"
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """A non-streamed chat answer, as sharpen builds it when a strategy chose the answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sharpen: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "sharpen"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
