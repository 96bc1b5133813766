"""The OpenAI-compatible HTTP API of ``fedrouter serve`` (FastAPI), and the playground page.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` with server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /`` (the playground). The ``model`` field chooses the routing
(``model_routes``); ``/v1/models`` gives each model a ``description`` (``model_descriptions``: an adapter's is its
cluster's readable name, its id ``cluster_<g>`` never changes). Every answer carries a ``fedrouter`` object (the
adapter that served it and its name, the routing distance and the distances to every global centroid) and the
headers ``X-FedRouter-Adapter`` / ``X-FedRouter-Distance``.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed body, an
unknown or unsupported field or a prompt longer than the context, 401 for a missing or wrong key, 404 for an
unknown model (the message lists the valid ones), 413 for a body over 1 MiB, 429 with ``Retry-After`` when the
queue is full, 503 at once when the engine failed (``/health`` then fails too). A request's text never reaches the
file system: it is tokenized, embedded and answered in memory, and the access log (``AccessLog``, one line per
request on the ``fedrouter.access`` logger) holds its model, adapter, token counts and latency, never its text.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.middleware.base import BaseHTTPMiddleware

from fedrouter.model.decoding import Completion, Sampling
from fedrouter.serving.engine import FAILED, READY, Engine, QueueFull, Unavailable
from fedrouter.serving.engine import Request as EngineRequest
from fedrouter.serving.gateway import VllmGateway
from fedrouter.serving.options import ServeOptions
from fedrouter.serving.router import Choice, Prompt, PromptTooLong, Route, Router

MAX_BODY = 1 << 20
DEFAULT_MAX_TOKENS = 128
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
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request bodies: unknown fields are errors, so a setting the server would ignore is never silently lost ----


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str = "fedrouter"
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0  # greedy unless asked: the benchmark's decoding
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as a caller's label for its own end user

    @field_validator("stop")
    @classmethod
    def _nonempty_stop(cls, value):
        if value == "":
            raise ValueError("a stop string must not be empty")
        return value

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(self.budget(), self.temperature, self.top_p, stop, self.seed)

    def budget(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS


class ChatRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def prompt(self) -> Prompt:
        if not any(m.role == "user" for m in self.messages):
            raise ApiError(400, "messages: at least one message must have the role 'user'", param="messages")
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


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
        "distance": choice.distance,
        "distances": list(choice.distances),
        "fallback": choice.fallback,  # too far from its cluster: the fallback route (routing.fallback) served it
    }


def _headers(choice: Choice) -> dict[str, str]:
    headers = {"X-FedRouter-Adapter": _adapter_name(choice)}
    if choice.fallback:
        headers["X-FedRouter-Fallback"] = "true"
    if choice.distance is not None:
        headers["X-FedRouter-Distance"] = f"{choice.distance:.6g}"
    return headers


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
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
    return Response(status_code=499)  # nobody reads it: the status of nginx's "client closed request"


async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    where = _field(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {first.get('msg')} ({first.get('ctx', {}).get('error', '')})"
        return ApiError(400, message, param=None, code="invalid_json").response()
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"{where}: unknown or unsupported field", param=where, code="unknown_field").response()
    return ApiError(400, f"{where}: {first.get('msg')}", param=where, code="invalid_value").response()


async def _guard(request: Request, call_next, api_key: str | None) -> Response:
    """A body's size and length header, and the API key on ``/v1/``, before anything reads the body."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return ApiError(413, f"the body is over {MAX_BODY} bytes", code="body_too_large").response()
    if request.method == "POST" and length is None:
        return ApiError(411, "a request body needs a Content-Length header", code="length_required").response()
    if api_key is not None and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        expected = f"Bearer {api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return ApiError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer KEY')",
                kind="authentication_error",
                code="invalid_api_key",
            ).response()
    return await call_next(request)


async def _next_event(engine: Engine, http: Request, request: EngineRequest) -> tuple[str, object]:
    """The engine's next event for this request; a client gone meanwhile cancels the request, an engine that
    failed is a 503 (also when it failed before this request was queued and nothing will ever come)."""
    while True:
        try:
            kind, value = await asyncio.wait_for(request.events.get(), timeout=0.5)
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
    app.add_middleware(BaseHTTPMiddleware, dispatch=functools.partial(_guard, api_key=options.api_key))
    app.add_middleware(AccessLog)  # the outermost: it sees every answer, the guard's and the error handlers'

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

    async def through_gateway(path: str, prompt: Prompt, body: _Generation, param: str, http: Request) -> Response:
        assert gateway is not None
        route, _, _ = checked(prompt, body, param)
        choice = await gateway.choose(prompt, route)
        note(http, adapter=_adapter_name(choice))
        forwarded = body.model_dump(exclude_none=True, exclude={"user"})
        return await gateway.forward(
            path, forwarded, body.model, choice, _routing_info(router, route, choice), _headers(choice)
        )

    def admit(prompt: Prompt, body: _Generation, param: str) -> EngineRequest:
        route, sampling, ids = checked(prompt, body, param)
        request = EngineRequest(prompt, ids, route, sampling)
        try:
            engine.submit(request)
        except QueueFull as err:
            raise ApiError(
                429,
                f"too many requests: {err}",
                kind="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
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
            elif kind == "done":  # "text" pieces are for streams: the completion holds the whole text
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
        """Server-sent events: the chunks, a usage chunk when asked for, then ``[DONE]``."""
        try:
            yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
            while True:
                try:
                    kind, value = await _next_event(engine, http, request)
                except ApiError as err:  # the engine failed mid-stream: the status line is already sent
                    kind, value = "error", err.message
                if kind == "text":
                    yield f"data: {json.dumps(chunk(value, None))}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                    return
                elif kind == "done":
                    final = chunk(None, value.finish_reason)
                    final["fedrouter"] = _routing_info(router, request.route, choice)
                    note(http, prompt_tokens=value.prompt_tokens, completion_tokens=value.completion_tokens)
                    yield f"data: {json.dumps(final)}\n\n"
                    if body.stream_options and body.stream_options.include_usage:
                        yield f"data: {json.dumps({**chunk(None, None), 'choices': [], 'usage': usage(value)})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            engine.cancel(request)  # no-op once done; frees the row when the client left mid-stream

    async def respond(path: str, prompt, body, field: str, http: Request, chat: bool) -> Response:
        """One completion, streamed or whole, in the chat or the text API's shape."""
        note(http, model=body.model)
        if gateway is not None:
            return await through_gateway(path, prompt, body, field, http)
        request = admit(prompt, body, field)
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.stream:
            choice = await first_route(http, request)
            note(http, adapter=_adapter_name(choice))

            def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                    piece = {"delta": delta}
                else:
                    piece = {"text": text or ""}
                return {
                    "id": ident,
                    "object": f"{kind}.chunk" if chat else kind,
                    "created": created,
                    "model": body.model,
                    "choices": [{"index": 0, **piece, "finish_reason": finish, "logprobs": None}],
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
        answer = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": body.model,
            "choices": [{"index": 0, **piece, "finish_reason": _finish(done), "logprobs": None}],
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
