"""The request bodies of ``fedrouter serve``'s OpenAI-compatible API, as pydantic models (and so its OpenAPI schema).

``ChatRequest`` (``POST /v1/chat/completions``) and ``CompletionRequest`` (``POST /v1/completions``) share the
generation fields of ``GenerationRequest``. Unknown fields are errors, so a setting the server would ignore is never
silently lost; every string a request sends must be valid Unicode (``Text``). Each model also says what it asks
for: its ``Sampling``, its prompt, and what a valid body still cannot get here (``refuse_unsupported``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from fedrouter.model.decoding import MAX_TOP_LOGPROBS, Sampling
from fedrouter.serving.errors import ApiError
from fedrouter.serving.router import Prompt

DEFAULT_MAX_TOKENS = 128


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {err.start}") from None
    return text


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("a stop string must not be empty")
    return text


Text = Annotated[str, AfterValidator(_encodable)]  # every string a request sends: tokenized, logged or echoed
# An answer ends before its stop string, so an empty one would end it at once (the schema says so too).
Stop = Annotated[Text, AfterValidator(_nonempty), WithJsonSchema({"type": "string", "minLength": 1})]
Penalty = Annotated[float, Field(ge=-2, le=2)]


def _count_or_flag(value: object) -> object:
    if value is False:
        return None
    return 0 if value is True else value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")  # a ``json_schema`` is refused by its type, not as an unknown field
    type: Literal["text", "json_object", "json_schema"]


class GenerationRequest(_Strict):
    """The fields both completion endpoints take: the model (the routing), the budget, sampling and streaming."""

    model: Text = "fedrouter"
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0  # greedy unless asked: the benchmark's decoding
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: Stop | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None  # {"type": "text"} only
    user: Text | None = None  # accepted and ignored, as a caller's label for its own end user

    def refuse_unsupported(self) -> None:
        """A valid body this server still cannot answer as asked: a 400 naming the field."""
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(
                400,
                f"response_format: {self.response_format.type!r} is not supported, only {{'type': 'text'}}",
                param="response_format",
                code="unsupported_parameter",
            )

    def top_logprobs_count(self) -> int | None:
        """How many alternatives to give with each token's log-probability; None: no log-probabilities."""
        return None

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            self.budget(),
            self.temperature,  # below decoding.GREEDY_BELOW, greedy (Sampling.greedy)
            self.top_p,
            stop,
            self.seed,
            self.presence_penalty,
            self.frequency_penalty,
            self.top_logprobs_count(),
        )

    def budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS


USER_TURN = {"properties": {"role": {"const": "user"}}, "required": ["role"]}  # a chat needs one (``prompt``)


class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``: a chat, answered under the model's chat template."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, json_schema_extra={"contains": USER_TURN})]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs", code="invalid_value")

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt(self) -> Prompt:
        if not any(m.role == "user" for m in self.messages):
            raise ApiError(400, "messages: at least one message must have the role 'user'", param="messages")
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: one prompt, answered as one user turn (the way the adapters were trained)."""

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    # How many alternatives per token (OpenAI's legacy field is a number); ``false`` asks for none, as chat's
    # ``logprobs: false`` does, and ``true`` for the chosen tokens' alone (0), instead of a boolean read as 0 or 1.
    logprobs: Annotated[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None, BeforeValidator(_count_or_flag)] = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


# -- what every error answers (documented in the OpenAPI schema; ``errors.ApiError`` builds it) -------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error, in OpenAI's shape, whatever its status."""

    error: ErrorDetail
