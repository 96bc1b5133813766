"""The OpenAI-compatible HTTP API of ``fedrouter serve`` (FastAPI), and the playground page.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` with server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /`` (the playground). The ``model`` field chooses the routing
(``model_routes``); ``/v1/models`` gives each model a ``description`` (``model_descriptions``: an adapter's is its
cluster's readable name, its id ``cluster_<g>`` never changes). Every answer carries a ``fedrouter`` object (the
adapter that served it and its name, the routing distance and the distances to every global centroid) and the
headers ``X-FedRouter-Adapter`` / ``X-FedRouter-Distance``.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, on every path: 400 for a
malformed body (text that is not valid Unicode included), an unknown or unsupported field (``n`` > 1, tools, JSON
output) or a prompt longer than the context, 401 for a missing or wrong key, 404 for an unknown model (the message
lists the valid ones) or path, 413 for a body over 1 MiB, 429 with ``Retry-After`` when the queue is full, 503 at
once when the engine failed (``/health`` then fails too), 500 (no detail) for anything unforeseen. A client that
disconnects, streaming or not, frees its place at once. A request's text never reaches the
file system: it is tokenized, embedded and answered in memory, and the access log (``AccessLog``, one line per
request on the ``fedrouter.access`` logger) holds its model, adapter, token counts and latency, never its text.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from fedrouter.model.decoding import MAX_TOP_LOGPROBS, Completion, Sampling, TokenLogprob
from fedrouter.serving.engine import FAILED, READY, Engine, QueueFull, Unavailable
from fedrouter.serving.engine import Request as EngineRequest
from fedrouter.serving.gateway import VllmGateway
from fedrouter.serving.logprobs import TokenText
from fedrouter.serving.options import ServeOptions
from fedrouter.serving.router import Choice, Prompt, PromptTooLong, Route, Router

MAX_BODY = 1 << 20
DEFAULT_MAX_TOKENS = 128
POLL_S = 0.2  # how often a request waiting for its answer checks that its client is still there
# Fields of OpenAI's API that this server cannot honour, refused by name (any other unknown field is refused too).
UNSUPPORTED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
}
PLAYGROUND = resources.files("fedrouter.serving") / "playground"
NOTES = "fedrouter_access"  # the key of a request's access-log notes in its ASGI scope's state

access_log = logging.getLogger("fedrouter.access")


class ClientGone(Exception):
    """The caller closed its connection before its answer was ready."""


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        message, param = _unicode(message), None if param is None else _unicode(param)
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _unicode(text: str) -> str:
    """``text`` with any lone surrogate (valid in JSON's escapes, not in UTF-8) written ``?``: safe to send."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {err.start}") from None
    return text


# -- request bodies: unknown fields are errors, so a setting the server would ignore is never silently lost ----

Text = Annotated[str, AfterValidator(_encodable)]  # every string a request sends: tokenized, logged or echoed


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


Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Generation(_Strict):
    model: Text = "fedrouter"
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0  # greedy unless asked: the benchmark's decoding
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: Text | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=4)] | None = None
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

    @field_validator("stop")
    @classmethod
    def _nonempty_stop(cls, value):
        if value == "":
            raise ValueError("a stop string must not be empty")
        return value

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            self.budget(),
            self.temperature,
            self.top_p,
            stop,
            self.seed,
            self.presence_penalty,
            self.frequency_penalty,
            self.top_logprobs_count(),
        )

    def budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS


class ChatRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
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


class CompletionRequest(_Generation):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def top_logprobs_count(self) -> int | None:
        return self.logprobs


# -- the application ---------------------------------------------------------------------------------------


def model_routes(router: Router) -> dict[str, Route]:
    """The ``model`` names a caller may use, and how each routes."""
    routes = {"fedrouter": Route("global")}
    routes |= {f"fedrouter-local:{c}": Route("local", client=c) for c in router.clients}
    routes |= {f"cluster_{g}": Route("cluster", cluster=g) for g in range(router.num_adapters)}
    routes["base"] = Route("base")
    return routes


def model_descriptions(router: Router) -> dict[str, str]:
    """What each ``model`` of ``model_routes`` is, for people: an adapter's description is its cluster's name."""
    described = {"fedrouter": "routes each prompt to the adapter of the nearest global cluster"}
    described |= {f"fedrouter-local:{c}": f"routes each prompt by client {c}'s local clusters" for c in router.clients}
    described |= {f"cluster_{g}": name for g, name in enumerate(router.names)}
    described["base"] = "the base model, no adapter"
    return described


def _adapter_name(choice: Choice) -> str:
    return "base" if choice.adapter is None else f"cluster_{choice.adapter}"


def _routing_info(router: Router, route: Route, choice: Choice) -> dict:
    return {
        "adapter": _adapter_name(choice),
        "name": router.name(choice.adapter),
        "routing": route.mode,
        "distance": _finite(choice.distance),
        "distances": [_finite(d) for d in choice.distances],
        "fallback": choice.fallback,  # too far from its cluster: the fallback route (routing.fallback) served it
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a distance that is not a number is sent as null."""
    return value if value is None or math.isfinite(value) else None


def _headers(choice: Choice) -> dict[str, str]:
    headers = {"X-FedRouter-Adapter": _adapter_name(choice)}
    if choice.fallback:
        headers["X-FedRouter-Fallback"] = "true"
    if _finite(choice.distance) is not None:
        headers["X-FedRouter-Distance"] = f"{choice.distance:.6g}"
    return headers


def _field(loc: tuple) -> str:
    """The field an error is about, as a caller names it: without pydantic's tags for the member of a union that
    failed (``str``, ``list[TextPart]``, ``function-after[...]``)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p == "str" or "[" in p))]
    return ".".join(parts) or "body"


# -- the access log ------------------------------------------------------------------------------------------


class AccessLog:
    """ASGI middleware: one line per HTTP request on the ``fedrouter.access`` logger once its response is sent
    (a stream's once it ended), errors included: method, path, status, model, adapter, prompt and completion
    tokens, latency in ms. The handlers add only what ``note`` takes; a prompt or an answer is never logged."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        notes: dict[str, object] = {}
        scope.setdefault("state", {})[NOTES] = notes
        status = 500  # no response was sent: the app raised

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            access_log.info(access_line(scope, status, notes, time.perf_counter() - started))


def note(http: Request, **fields: object) -> None:
    """Add ``model``, ``adapter``, ``prompt_tokens`` or ``completion_tokens`` to this request's access line."""
    http.scope.setdefault("state", {}).setdefault(NOTES, {}).update(fields)


def access_line(scope, status: int, notes: dict, seconds: float) -> str:
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    fields = ("model", "adapter", "prompt_tokens", "completion_tokens")
    noted = " ".join(f"{name}={_printable(str(notes.get(name, '-')), 64)}" for name in fields)
    return (
        f"{scope.get('method', '-')} {_printable(raw.decode('latin-1'), 200)} {status} {noted} ms={seconds * 1000:.1f}"
    )


def _printable(text: str, limit: int) -> str:
    """One field of a log line: no space, line break or control character a caller could forge lines with."""
    clean = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "") or "-"


def health_report(engine: Engine, router: Router) -> tuple[int, dict]:
    """``/health``: 200 and ``ready`` once the engine has warmed up; before, 503 and ``starting``; 503 and
    ``failed`` (with the reason) when it cannot answer, or ``stopped``."""
    state = engine.state
    report = {
        "status": state,
        "adapters": router.num_adapters,
        "clients": router.clients,
        "queue": engine.load,
        "max_queue": engine.options.max_queue,
        "max_batch": engine.options.max_batch,
        "max_batch_tokens": engine.options.max_batch_tokens,
        "steps": engine.steps,
        "served": engine.served,
        "cancelled": engine.cancelled,
        "peak_batch": engine.peak_batch,
        "ready_after_s": engine.ready_after_s,
    }
    if state == FAILED:
        report["error"] = engine.failure
    return (200 if state == READY else 503), report


def _unavailable(message: str) -> ApiError:
    return ApiError(503, message, kind="server_error", code="engine_unavailable")


# -- what every route shares: errors, the guard on size and key, the engine's events --------------------------


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def _client_gone(request: Request, err: ClientGone) -> Response:
    # Nobody reads it: the status of nginx's "client closed request".
    return ApiError(499, "the client closed the connection", code="client_closed_request").response()


async def _http_error(request: Request, err: HTTPException) -> Response:
    """Starlette's own errors (an unknown path, a method a path does not take, a body it could not read)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{request.method} {request.url.path[:200]}: {err.detail}"
    return ApiError(err.status_code, message, code=codes.get(err.status_code), headers=err.headers).response()


async def _internal_error(request: Request, err: Exception) -> Response:
    """Anything unforeseen: a 500 in OpenAI's shape; what went wrong stays in the server's log."""
    return ApiError(500, "internal server error", kind="server_error", code="internal_error").response()


async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    # A union (``prompt``: a string or a list) fails once per member: the error a value check raised says most.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    where = _field(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {first.get('msg')} ({first.get('ctx', {}).get('error', '')})"
        return ApiError(400, message, param=None, code="invalid_json").response()
    if first.get("type") == "extra_forbidden":
        if where in UNSUPPORTED:
            message = f"{where}: {UNSUPPORTED[where]} by this server"
            return ApiError(400, message, param=where, code="unsupported_parameter").response()
        return ApiError(400, f"{where}: unknown or unsupported field", param=where, code="unknown_field").response()
    return ApiError(400, f"{where}: {first.get('msg')}", param=where, code="invalid_value").response()


class Guard:
    """ASGI middleware: a body's size and length header, and the API key on ``/v1/``, before anything reads the
    body (plain ASGI, so the routes see the client's own ``receive`` and so its disconnect)."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        refused = self.refusal(scope) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
        else:
            await refused.response()(scope, receive, send)

    def refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return ApiError(413, f"the body is over {MAX_BODY} bytes", code="body_too_large")
        if scope.get("method") == "POST" and length is None:
            return ApiError(411, "a request body needs a Content-Length header", code="length_required")
        if self.api_key is not None and scope.get("path", "").startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return ApiError(
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer KEY')",
                    kind="authentication_error",
                    code="invalid_api_key",
                )
        return None


async def _next_event(engine: Engine, http: Request, request: EngineRequest) -> tuple[str, object]:
    """The engine's next event for this request; a client gone meanwhile cancels the request, an engine that
    failed is a 503 (also when it failed before this request was queued and nothing will ever come)."""
    while True:
        try:
            kind, value = await asyncio.wait_for(request.events.get(), timeout=POLL_S)
        except TimeoutError:
            try:
                engine.check()
            except Unavailable as err:
                raise _unavailable(str(err)) from None
            if await http.is_disconnected():
                engine.cancel(request)
                raise ClientGone from None
            continue
        if kind == "unavailable":
            raise _unavailable(str(value))
        return kind, value


def create_app(router: Router, options: ServeOptions | None = None, *, gateway: VllmGateway | None = None) -> FastAPI:
    """The app, serving under ``options`` (default ``ServeOptions()``); with ``gateway`` the answers come from a
    vLLM server and this process only embeds and routes."""
    options = options or ServeOptions()
    engine = Engine(router, options)
    routes = model_routes(router)
    descriptions = model_descriptions(router)
    tokenizer = copy.deepcopy(router.base.tokenizer)  # the event loop's own: the engine thread uses the model's

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start(asyncio.get_running_loop())
        yield
        engine.stop()
        if gateway is not None:
            await gateway.close()

    app = FastAPI(title="FedRouter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(Guard, api_key=options.api_key)
    app.add_middleware(AccessLog)  # it sees every answer, the guard's and the error handlers'
    tokens = TokenText(tokenizer)
    held = [0]  # requests the vLLM gateway is embedding, routing or waiting on (the local engine counts its own)

    def resolve(name: str) -> Route:
        if name not in routes:
            raise ApiError(
                404,
                f"model {name!r} does not exist; the models are: {', '.join(routes)}",
                param="model",
                code="model_not_found",
            )
        return routes[name]

    def checked(prompt: Prompt, body: _Generation, param: str) -> tuple[Route, Sampling, list[int]]:
        try:
            engine.check()
        except Unavailable as err:
            raise _unavailable(str(err)) from None
        route = resolve(body.model)
        try:
            sampling = body.sampling()
            return route, sampling, router.encode(prompt, sampling.max_new_tokens, tokenizer)
        except PromptTooLong as err:
            raise ApiError(400, str(err), param=param, code="context_length_exceeded") from None
        except ValueError as err:
            raise ApiError(400, str(err), param=param) from None

    def full_queue(message: str) -> ApiError:
        return ApiError(
            429,
            f"too many requests: {message}",
            kind="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        )

    async def through_gateway(path: str, prompt: Prompt, body: _Generation, param: str, http: Request) -> Response:
        assert gateway is not None
        route, _, _ = checked(prompt, body, param)
        if held[0] >= options.max_queue:
            raise full_queue(f"{options.max_queue} requests are already being routed or answered")
        held[0] += 1  # from here until vLLM's answer (a stream's first bytes) is back
        try:
            choice = await gateway.choose(prompt, route)
            note(http, adapter=_adapter_name(choice))
            # vLLM gets what the caller set, and our defaults where they differ from vLLM's (temperature 0)
            unset = {"presence_penalty", "frequency_penalty", "logprobs", "response_format"} - body.model_fields_set
            forwarded = body.model_dump(exclude_none=True, exclude={"user"} | unset)
            return await gateway.forward(
                path, forwarded, body.model, choice, _routing_info(router, route, choice), _headers(choice)
            )
        finally:
            held[0] -= 1

    def admit(prompt: Prompt, body: _Generation, param: str) -> EngineRequest:
        route, sampling, ids = checked(prompt, body, param)
        request = EngineRequest(prompt, ids, route, sampling, stream=body.stream)
        try:
            engine.submit(request)
        except QueueFull as err:
            raise full_queue(str(err)) from None
        except Unavailable as err:
            raise _unavailable(str(err)) from None
        return request

    async def finish(http: Request, request: EngineRequest) -> tuple[Choice, Completion]:
        choice = None
        while True:
            kind, value = await _next_event(engine, http, request)
            if kind == "route":
                choice = value
            elif kind == "error":
                raise ApiError(500, str(value), kind="server_error")
            elif kind == "done":  # a request that does not stream gets no pieces: the completion holds them
                assert choice is not None
                return choice, value

    async def first_route(http: Request, request: EngineRequest) -> Choice:
        kind, value = await _next_event(engine, http, request)
        if kind == "error":
            raise ApiError(500, str(value), kind="server_error")
        assert kind == "route"
        return value

    def usage(done: Completion) -> dict:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        }

    async def stream(
        http: Request, request: EngineRequest, body: _Generation, choice: Choice, chunk
    ) -> AsyncIterator[str]:
        """Server-sent events: the chunks (each with its tokens' log-probabilities when asked for), a usage chunk
        when asked for, then ``[DONE]``."""
        sent: list[TokenLogprob] = []  # log-probabilities already sent, and those of the next piece
        pending: tuple[TokenLogprob, ...] = ()
        try:
            yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
            while True:
                try:
                    kind, value = await _next_event(engine, http, request)
                except ApiError as err:  # the engine failed mid-stream: the status line is already sent
                    kind, value = "error", err.message
                if kind == "logprobs":
                    pending += value
                elif kind == "text":
                    yield f"data: {json.dumps(chunk(value, None, logprobs=pending, before=sent))}\n\n"
                    sent += pending
                    pending = ()
                elif kind == "error":
                    error = {"message": value, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                elif kind == "done":
                    rest = value.logprobs[len(sent) :] if body.top_logprobs_count() is not None else None
                    final = chunk(None, _finish(value), logprobs=rest, before=sent)
                    final["fedrouter"] = _routing_info(router, request.route, choice)
                    note(http, prompt_tokens=value.prompt_tokens, completion_tokens=value.completion_tokens)
                    yield f"data: {json.dumps(final)}\n\n"
                    if body.stream_options and body.stream_options.include_usage:
                        yield f"data: {json.dumps({**chunk(None, None), 'choices': [], 'usage': usage(value)})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            engine.cancel(request)  # no-op once done; frees the row when the client left mid-stream

    def logprobs_of(chat: bool, entries, before: Sequence[TokenLogprob] = ()) -> dict | None:
        """``choices[].logprobs``: None when not asked for (``entries`` None)."""
        if entries is None:
            return None
        if chat:
            return tokens.chat(entries)
        return tokens.completion(entries, sum(len(tokens.of(e.token)[0]) for e in before))

    async def respond(path: str, prompt, body: _Generation, field: str, http: Request, chat: bool) -> Response:
        """One completion, streamed or whole, in the chat or the text API's shape."""
        note(http, model=body.model)
        body.refuse_unsupported()
        if gateway is not None:
            return await through_gateway(path, prompt, body, field, http)
        request = admit(prompt, body, field)
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        asked = body.top_logprobs_count() is not None
        if body.stream:
            choice = await first_route(http, request)
            note(http, adapter=_adapter_name(choice))

            def chunk(text: str | None, finish: str | None, first: bool = False, logprobs=None, before=()) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                    piece = {"delta": delta}
                else:
                    piece = {"text": text or ""}
                shaped = logprobs_of(chat, logprobs if asked and not first else None, before)
                return {
                    "id": ident,
                    "object": f"{kind}.chunk" if chat else kind,
                    "created": created,
                    "model": body.model,
                    "choices": [{"index": 0, **piece, "finish_reason": finish, "logprobs": shaped}],
                }

            return StreamingResponse(
                stream(http, request, body, choice, chunk), media_type="text/event-stream", headers=_headers(choice)
            )
        choice, done = await finish(http, request)
        note(
            http,
            adapter=_adapter_name(choice),
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )
        piece = {"message": {"role": "assistant", "content": done.text}} if chat else {"text": done.text}
        logprobs = logprobs_of(chat, done.logprobs if asked else None)
        answer = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, **piece, "finish_reason": _finish(done), "logprobs": logprobs}],
            "usage": usage(done),
            "fedrouter": _routing_info(router, request.route, choice),
        }
        return JSONResponse(answer, headers=_headers(choice))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request) -> Response:
        return await respond("/v1/chat/completions", body.prompt(), body, "messages", http, chat=True)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, http: Request) -> Response:
        return await respond("/v1/completions", body.text(), body, "prompt", http, chat=False)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "fedrouter",
                    "routing": route.mode,
                    "description": descriptions[name],
                }
                for name, route in routes.items()
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        status, report = health_report(engine, router)
        return JSONResponse(report, status_code=status)

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(str(PLAYGROUND / "index.html"), media_type="text/html")

    @app.get("/playground/{name}")
    async def playground_file(name: str) -> FileResponse:
        files = {"app.js": "text/javascript", "style.css": "text/css"}
        if name not in files:  # a fixed list: no path a request sends reaches the file system
            raise ApiError(404, f"no playground file {name!r}", code="not_found")
        return FileResponse(str(PLAYGROUND / name), media_type=files[name])

    return app


def _finish(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"
