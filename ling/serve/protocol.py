"""The OpenAI wire format: request bodies (validated by pydantic), errors, and response helpers.

Requests keep OpenAI's rules: unknown fields are ignored; a value outside its range is an
HTTP 400 whose body is OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`,
with `param` naming the offending field, so every OpenAI client reports it properly.

Bodies are parsed by pydantic's own JSON parser in strict mode, straight from the bytes:
types are exact (`max_tokens: true`, `stream: "yes"`, `prompt: [[false]]` are errors, not
1, True and [[0]]), numbers are finite, and what Python's `json` would turn into a 500 —
100k-deep nesting, a 5,000-digit integer, a lone surrogate `"\ud800"` — is invalid JSON
(400) before any of it reaches the tokenizer.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_STOP_SEQUENCES = 4
MAX_N = 128
_TYPE_TAG = re.compile(r"^(str|int|float|bool|[\w-]+\[.*\])$")


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


UNION_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "content": "a string, a list of text parts ({\"type\": \"text\", \"text\": ...}) or null",
}
"""What a field of several accepted types may be (pydantic would name only the first type)."""


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI 400 naming the field (e.g. `messages.0.role`)."""
    first = e.errors()[0]
    if first["type"] == "json_invalid":
        reason = first["msg"].removeprefix("Invalid JSON: ")
        return APIError(400, f"the request body is not valid JSON ({reason})", code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "the request body must be a JSON object")
    # Union members appear in the location as type tags ('str', 'list[int]'): not field names.
    tagged = any(isinstance(part, str) and _TYPE_TAG.match(part) for part in first["loc"])
    loc = [str(part) for part in first["loc"] if isinstance(part, int) or not _TYPE_TAG.match(part)]
    param = ".".join(loc) or None
    message = first["msg"].removeprefix("Value error, ")
    union = UNION_TYPES.get(loc[-1]) if tagged and loc and loc[-1] in UNION_TYPES else None
    if union is not None and first["type"].endswith("_type"):
        message = f"must be {union}"
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: list[str] = Field(default_factory=list)
    """one string or up to four; OpenAI accepts both (and null)"""
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1 - MAX_N)] | None = None
    """int64, as torch.Generator takes it (choice i samples with seed + i)"""
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
        if isinstance(stops, list) and len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        return stops

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stops):
        if "" in stops:
            raise ValueError("a stop sequence must not be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        """The {role, content} dict a chat template reads (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top, info: ValidationInfo):
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        """None: no logprobs; k ≥ 0: the chosen token's logprob plus the top k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Request):
    prompt: Union[str, Annotated[list[str], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo):
        if echo:
            raise ValueError("echo is not supported by this server")
        return echo

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_count(self) -> int | None:
        return self.logprobs


def parse_request(cls: type[_Request], body: bytes) -> _Request:
    """The request in `body` (JSON bytes), strictly typed; an `APIError` 400 otherwise."""
    try:
        return cls.model_validate_json(body, strict=True)
    except ValidationError as e:
        raise validation_error(e) from None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx and 5xx answer of the server has this shape."""

    error: ErrorDetail


# ---- responses --------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
