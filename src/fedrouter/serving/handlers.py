"""One handler per endpoint of ``fedrouter serve``, each callable without the HTTP app.

- ``ServingChat`` / ``ServingCompletion`` (``POST /v1/chat/completions``, ``POST /v1/completions``): a validated
  body in, an answer out, whole or as server-sent events (``EventStream``), in the chat or the text API's shape.
  Both admit requests through one ``Serving`` (the router, its engine, the model names, the event loop's own
  tokenizer, and the vLLM gateway when there is one);
- ``ServingModels`` (``GET /v1/models``): the ``model`` names a caller may use, each with how it routes;
- ``health_report`` (``GET /health``), ``playground_page`` and ``playground_file`` (``GET /``, its two files).

A handler sees its HTTP request only as a ``Call``: an awaitable that returns once its client has gone away, and
the access-log notes it adds (model, adapter, token counts). It raises ``errors.ApiError`` for what a caller gets
as an error.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import ClassVar

from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from fedrouter.model.decoding import Completion, Sampling, TokenLogprob
from fedrouter.serving.engine import FAILED, READY, Engine, QueueFull, Unavailable
from fedrouter.serving.engine import Request as EngineRequest
from fedrouter.serving.errors import ApiError, ClientGone, generation_failed, model_not_found, queue_full, unavailable
from fedrouter.serving.gateway import VllmGateway
from fedrouter.serving.logprobs import TokenText
from fedrouter.serving.protocol import ChatRequest, CompletionRequest, GenerationRequest
from fedrouter.serving.router import Choice, Prompt, PromptTooLong, Route, Router

# How often a request waiting for its answer checks that the engine still runs. A failing engine tells every request
# it holds at once; this only bounds the wait should one ever be missed. A client that goes away is not polled for
# (``watch``): 16 waiting requests polling 5 times a second kept the event loop busy enough, through the interpreter
# lock the engine's thread needs between its tensor operations, to cost the server about 10% of its tokens per
# second (16 clients, 2-core CPU: 64 requests in 25.7 s against 23.4 s, medians of 6 alternating runs, noisy).
CHECK_S = 1.0
PLAYGROUND = resources.files("fedrouter.serving") / "playground"
PLAYGROUND_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


@dataclass
class Call:
    """One HTTP request as a handler sees it: ``gone()`` returns once its client has gone away (it may wait
    forever), and its access-log notes."""

    gone: Callable[[], Awaitable[None]]
    notes: dict[str, object] = field(default_factory=dict)

    def note(self, **fields: object) -> None:
        """Add ``model``, ``adapter``, ``prompt_tokens`` or ``completion_tokens`` to the request's access line."""
        self.notes.update(fields)


# -- GET /v1/models ------------------------------------------------------------------------------------------------


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


class ServingModels:
    """The models of ``router`` (``model_routes``): ``GET /v1/models``, and the route a request's ``model`` names."""

    def __init__(self, router: Router) -> None:
        self.routes = model_routes(router)
        self.descriptions = model_descriptions(router)

    def resolve(self, name: str) -> Route:
        """The route of model ``name``; an unknown one is a 404 listing the valid ones."""
        if name not in self.routes:
            raise model_not_found(name, list(self.routes))
        return self.routes[name]

    def listing(self) -> dict:
        """``GET /v1/models``: OpenAI's model list, each model with its ``routing`` and ``description``."""
        created = int(time.time())
        return {"object": "list", "data": [self.card(name, created) for name in self.routes]}

    def card(self, name: str, created: int) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "fedrouter",
            "routing": self.routes[name].mode,
            "description": self.descriptions[name],
        }


# -- GET /health, the playground -----------------------------------------------------------------------------------


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


def playground_page() -> FileResponse:
    return FileResponse(str(PLAYGROUND / "index.html"), media_type="text/html")


def playground_file(name: str) -> FileResponse:
    """One of the playground's files, from a fixed list: no path a request sends reaches the file system."""
    if name not in PLAYGROUND_FILES:
        raise ApiError(404, f"no playground file {name!r}", code="not_found")
    return FileResponse(str(PLAYGROUND / name), media_type=PLAYGROUND_FILES[name])


# -- what an answer says about its routing -------------------------------------------------------------------------


def adapter_name(choice: Choice) -> str:
    return "base" if choice.adapter is None else f"cluster_{choice.adapter}"


def routing_info(router: Router, route: Route, choice: Choice) -> dict:
    """An answer's ``fedrouter`` object."""
    return {
        "adapter": adapter_name(choice),
        "name": router.name(choice.adapter),
        "routing": route.mode,
        "distance": _finite(choice.distance),
        "distances": [_finite(d) for d in choice.distances],
        "fallback": choice.fallback,  # too far from its cluster: the fallback route (routing.fallback) served it
    }


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: a distance that is not a number is sent as null."""
    return value if value is None or math.isfinite(value) else None


def routing_headers(choice: Choice) -> dict[str, str]:
    headers = {"X-FedRouter-Adapter": adapter_name(choice)}
    if choice.fallback:
        headers["X-FedRouter-Fallback"] = "true"
    if _finite(choice.distance) is not None:
        headers["X-FedRouter-Distance"] = f"{choice.distance:.6g}"
    return headers


def usage(done: Completion) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def finish_reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def sse(event: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(event)}\n\n"


# -- the engine's events for one request ---------------------------------------------------------------------------


def _running(engine: Engine) -> None:
    try:
        engine.check()
    except Unavailable as err:
        raise unavailable(str(err)) from None


async def next_event(engine: Engine, request: EngineRequest) -> tuple[str, object]:
    """The engine's next event for ``request``: ``ClientGone`` once its client has gone (``watch``), a 503 once the
    engine failed (also when it failed before this request was queued and nothing will ever come)."""
    while True:
        try:
            kind, value = await asyncio.wait_for(request.events.get(), timeout=CHECK_S)
        except TimeoutError:
            _running(engine)
            continue
        if kind == "gone":
            raise ClientGone
        if kind == "unavailable":
            raise unavailable(str(value))
        return kind, value


def watch(engine: Engine, call: Call, request: EngineRequest) -> asyncio.Task:
    """Until cancelled, waits for ``call``'s client to go away; then ``request`` leaves the engine (a row being
    decoded finishes at its next token) and a ("gone", None) event wakes whoever waits on its events."""

    async def watching() -> None:
        await call.gone()
        engine.cancel(request)
        request.events.put_nowait(("gone", None))

    return asyncio.create_task(watching())


# -- admission, shared by the completion handlers ------------------------------------------------------------------


class Serving:
    """What the completion handlers share: the router, its engine, the model names, the event loop's own
    tokenizer (the engine thread uses the model's), and the vLLM gateway when there is one, with ``held``: the
    requests it is embedding, routing or waiting on (the local engine counts its own)."""

    def __init__(self, router: Router, engine: Engine, gateway: VllmGateway | None = None) -> None:
        self.router, self.engine, self.gateway = router, engine, gateway
        self.models = ServingModels(router)
        self.tokenizer = copy.deepcopy(router.base.tokenizer)
        self.tokens = TokenText(self.tokenizer)
        self.held = 0

    def check(self, prompt: Prompt, body: GenerationRequest, param: str) -> tuple[Route, Sampling, list[int]]:
        """The request's route, sampling and encoded prompt; a 503 when the engine cannot answer, a 404 for an
        unknown model, a 400 (naming ``param``) for a prompt the model cannot take."""
        _running(self.engine)
        route = self.models.resolve(body.model)
        try:
            sampling = body.sampling()
            return route, sampling, self.router.encode(prompt, sampling.max_new_tokens, self.tokenizer)
        except PromptTooLong as err:
            raise ApiError(400, str(err), param=param, code="context_length_exceeded") from None
        except ValueError as err:
            raise ApiError(400, str(err), param=param) from None

    def admit(self, prompt: Prompt, body: GenerationRequest, param: str) -> EngineRequest:
        """The request, checked and queued on the engine; a 429 when the queue is full."""
        route, sampling, ids = self.check(prompt, body, param)
        request = EngineRequest(prompt, ids, route, sampling, stream=body.stream)
        try:
            self.engine.submit(request)
        except QueueFull as err:
            raise queue_full(str(err)) from None
        except Unavailable as err:
            raise unavailable(str(err)) from None
        return request

    async def answer(self, request: EngineRequest) -> tuple[Choice, Completion]:
        """The route and the whole completion of a request that does not stream (no pieces: the completion holds
        them)."""
        choice = None
        while True:
            kind, value = await next_event(self.engine, request)
            if kind == "route":
                choice = value
            elif kind == "error":
                raise generation_failed(str(value))
            elif kind == "done":
                assert choice is not None
                return choice, value

    async def first_route(self, request: EngineRequest) -> Choice:
        kind, value = await next_event(self.engine, request)
        if kind == "error":
            raise generation_failed(str(value))
        assert kind == "route"
        return value

    async def forward(self, path: str, prompt: Prompt, body: GenerationRequest, param: str, call: Call) -> Response:
        """The request routed here and answered by the vLLM gateway, under the same queue limit."""
        assert self.gateway is not None
        route, _, _ = self.check(prompt, body, param)
        limit = self.engine.options.max_queue
        if self.held >= limit:
            raise queue_full(f"{limit} requests are already being routed or answered")
        self.held += 1  # from here until vLLM's answer (a stream's first bytes) is back
        try:
            choice = await self.gateway.choose(prompt, route)
            call.note(adapter=adapter_name(choice))
            info = routing_info(self.router, route, choice)
            return await self.gateway.forward(path, forwarded(body), body.model, choice, info, routing_headers(choice))
        finally:
            self.held -= 1


def forwarded(body: GenerationRequest) -> dict:
    """What vLLM gets: what the caller set, and our defaults where they differ from vLLM's (temperature 0)."""
    unset = {"presence_penalty", "frequency_penalty", "logprobs", "response_format"} - body.model_fields_set
    return body.model_dump(exclude_none=True, exclude={"user"} | unset)


# -- POST /v1/chat/completions, POST /v1/completions ---------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer's fixed parts: its id, when it was made, the model asked for, whether log-probabilities were."""

    ident: str
    created: int
    model: str
    asked: bool

    @classmethod
    def of(cls, prefix: str, body: GenerationRequest) -> Reply:
        ident = f"{prefix}-{uuid.uuid4().hex}"
        return cls(ident, int(time.time()), body.model, body.top_logprobs_count() is not None)


class ServingGeneration:
    """One completion endpoint: admits a body's prompt, then answers it whole or streamed. What differs between
    the chat and the text API (the prompt, the shape of a choice and of its log-probabilities) are the hooks the
    two subclasses override."""

    path: ClassVar[str]
    param: ClassVar[str]  # the field a prompt that the model cannot take is refused by
    prefix: ClassVar[str]  # of an answer's id
    kind: ClassVar[str]  # an answer's ``object``
    chunk_kind: ClassVar[str]  # a stream chunk's ``object``

    def __init__(self, serving: Serving) -> None:
        self.serving = serving

    def prompt(self, body) -> Prompt:
        raise NotImplementedError

    def message(self, text: str) -> dict:
        """A whole answer's choice, without its index, finish reason and log-probabilities."""
        raise NotImplementedError

    def delta(self, text: str | None, first: bool) -> dict:
        """A stream chunk's choice, as ``message``."""
        raise NotImplementedError

    def logprobs(self, entries: Sequence[TokenLogprob] | None, before: Sequence[TokenLogprob] = ()) -> dict | None:
        """``choices[].logprobs`` of ``entries``, after the tokens ``before`` them; None when not asked for."""
        raise NotImplementedError

    async def create(self, body: GenerationRequest, call: Call) -> Response:
        """The answer to ``body``: JSON, or server-sent events when it streams."""
        prompt = self.prompt(body)
        call.note(model=body.model)
        body.refuse_unsupported()
        if self.serving.gateway is not None:
            return await self.serving.forward(self.path, prompt, body, self.param, call)
        request = self.serving.admit(prompt, body, self.param)
        watcher = watch(self.serving.engine, call, request)
        reply = Reply.of(self.prefix, body)
        if body.stream:
            return await self.streamed(body, request, reply, call, watcher)  # the stream cancels it when it ends
        try:
            return await self.whole(request, reply, call)
        finally:
            watcher.cancel()

    async def whole(self, request: EngineRequest, reply: Reply, call: Call) -> JSONResponse:
        choice, done = await self.serving.answer(request)
        call.note(
            adapter=adapter_name(choice), prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens
        )
        logprobs = self.logprobs(done.logprobs if reply.asked else None)
        answer = {
            "id": reply.ident,
            "object": self.kind,
            "created": reply.created,
            "model": reply.model,
            "choices": [
                {"index": 0, **self.message(done.text), "finish_reason": finish_reason(done), "logprobs": logprobs}
            ],
            "usage": usage(done),
            "fedrouter": routing_info(self.serving.router, request.route, choice),
        }
        return JSONResponse(answer, headers=routing_headers(choice))

    async def streamed(
        self, body: GenerationRequest, request: EngineRequest, reply: Reply, call: Call, watcher: asyncio.Task
    ) -> Response:
        """The stream's response, once the request is routed; ``watcher`` (``watch``) runs until the stream ends."""
        try:
            choice = await self.serving.first_route(request)
        except BaseException:
            watcher.cancel()
            raise
        call.note(adapter=adapter_name(choice))
        events = EventStream(self, body, request, reply, choice, call, watcher)
        return StreamingResponse(events.lines(), media_type="text/event-stream", headers=routing_headers(choice))

    def chunk(
        self,
        reply: Reply,
        text: str | None,
        finish: str | None,
        *,
        first: bool = False,
        logprobs: Sequence[TokenLogprob] | None = None,
        before: Sequence[TokenLogprob] = (),
    ) -> dict:
        """One stream chunk: a piece of ``text`` (the first chunk: none), with its tokens' log-probabilities."""
        shaped = self.logprobs(logprobs if reply.asked and not first else None, before)
        return {
            "id": reply.ident,
            "object": self.chunk_kind,
            "created": reply.created,
            "model": reply.model,
            "choices": [{"index": 0, **self.delta(text, first), "finish_reason": finish, "logprobs": shaped}],
        }


class ServingChat(ServingGeneration):
    """``POST /v1/chat/completions``."""

    path, param, prefix = "/v1/chat/completions", "messages", "chatcmpl"
    kind, chunk_kind = "chat.completion", "chat.completion.chunk"

    def prompt(self, body: ChatRequest) -> Prompt:
        return body.prompt()

    def message(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    def delta(self, text: str | None, first: bool) -> dict:
        if first:
            return {"delta": {"role": "assistant", "content": ""}}
        return {"delta": {"content": text} if text else {}}

    def logprobs(self, entries: Sequence[TokenLogprob] | None, before: Sequence[TokenLogprob] = ()) -> dict | None:
        return None if entries is None else self.serving.tokens.chat(entries)


class ServingCompletion(ServingGeneration):
    """``POST /v1/completions``: the prompt is answered as one user turn."""

    path, param, prefix = "/v1/completions", "prompt", "cmpl"
    kind = chunk_kind = "text_completion"

    def prompt(self, body: CompletionRequest) -> Prompt:
        return body.text()

    def message(self, text: str) -> dict:
        return {"text": text}

    def delta(self, text: str | None, first: bool) -> dict:
        return {"text": text or ""}

    def logprobs(self, entries: Sequence[TokenLogprob] | None, before: Sequence[TokenLogprob] = ()) -> dict | None:
        if entries is None:
            return None
        tokens = self.serving.tokens
        return tokens.completion(entries, sum(len(tokens.of(e.token)[0]) for e in before))


class EventStream:
    """One streamed answer as server-sent events: a first chunk, a chunk per piece of text (with its tokens'
    log-probabilities when asked for), the last one with the routing, a usage chunk when asked for, then
    ``[DONE]``. An engine that fails mid-stream ends it with an ``error`` event (the status line is already sent);
    however it ends, the request leaves the engine."""

    def __init__(
        self,
        handler: ServingGeneration,
        body: GenerationRequest,
        request: EngineRequest,
        reply: Reply,
        choice: Choice,
        call: Call,
        watcher: asyncio.Task,
    ) -> None:
        self.handler, self.body, self.request = handler, body, request
        self.reply, self.choice, self.call, self.watcher = reply, choice, call, watcher
        self.engine = handler.serving.engine
        self.sent: list[TokenLogprob] = []  # log-probabilities already sent
        self.pending: tuple[TokenLogprob, ...] = ()  # those of the next piece
        self.ended = False

    async def lines(self) -> AsyncIterator[str]:
        on = {"logprobs": self.on_logprobs, "text": self.on_text, "error": self.on_error, "done": self.on_done}
        try:
            yield sse(self.handler.chunk(self.reply, None, None, first=True))
            while not self.ended:
                kind, value = await self.next()
                for line in on.get(kind, _nothing)(value):
                    yield line
        except ClientGone:  # the client left (``watch``): nobody to send the rest to, and nothing went wrong
            return
        finally:
            self.watcher.cancel()
            self.engine.cancel(self.request)  # no-op once done; frees the row when the client left mid-stream

    async def next(self) -> tuple[str, object]:
        try:
            return await next_event(self.engine, self.request)
        except ApiError as err:  # the engine failed mid-stream
            return "error", err.message

    def on_logprobs(self, value: tuple[TokenLogprob, ...]) -> list[str]:
        self.pending += value
        return []

    def on_text(self, value: str) -> list[str]:
        line = sse(self.handler.chunk(self.reply, value, None, logprobs=self.pending, before=self.sent))
        self.sent += self.pending
        self.pending = ()
        return [line]

    def on_error(self, message: str) -> list[str]:
        self.ended = True
        return [sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})]

    def on_done(self, done: Completion) -> list[str]:
        self.ended = True
        rest = done.logprobs[len(self.sent) :] if self.body.top_logprobs_count() is not None else None
        final = self.handler.chunk(self.reply, None, finish_reason(done), logprobs=rest, before=self.sent)
        final["fedrouter"] = routing_info(self.handler.serving.router, self.request.route, self.choice)
        self.call.note(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)
        lines = [sse(final)]
        if self.body.stream_options and self.body.stream_options.include_usage:
            lines.append(sse({**self.handler.chunk(self.reply, None, None), "choices": [], "usage": usage(done)}))
        return [*lines, "data: [DONE]\n\n"]


def _nothing(value: object) -> list[str]:
    return []
