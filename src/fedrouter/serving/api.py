"""The OpenAI-compatible HTTP API of ``fedrouter serve`` (FastAPI), and the playground page: thin routes.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` with server-sent events),
``GET /v1/models``, ``GET /health``, ``GET /`` (the playground), ``GET /openapi.json`` (the API's schema). The
``model`` field chooses the routing (``model_routes``); ``/v1/models`` gives each model a ``description``
(``model_descriptions``: an adapter's is its cluster's readable name, its id ``cluster_<g>`` never changes). Every
answer carries a ``fedrouter`` object (the adapter that served it and its name, the routing distance and the
distances to every global centroid) and the headers ``X-FedRouter-Adapter`` / ``X-FedRouter-Distance``.

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, on every path: 400 for a
malformed body (text that is not valid Unicode included), an unknown or unsupported field (``n`` > 1, tools, JSON
output) or a prompt longer than the context, 401 for a missing or wrong key, 404 for an unknown model (the message
lists the valid ones) or path, 413 for a body over 1 MiB, 429 with ``Retry-After`` when the queue is full, 503 at
once when the engine failed (``/health`` then fails too), 500 (no detail) for anything unforeseen. A client that
disconnects, streaming or not, frees its place at once. A request's text never reaches the
file system: it is tokenized, embedded and answered in memory, and the access log (``AccessLog``, one line per
request on the ``fedrouter.access`` logger) holds its model, adapter, token counts and latency, never its text.

Where the rest lives: the request bodies in ``protocol``, one handler per endpoint in ``handlers``, the error
mapping in ``errors``, the key and size guard and the access log in ``middleware``. A route here only parses,
calls its handler (kept in ``app.state``) and returns.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from functools import partial

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

import fedrouter
from fedrouter.serving import errors
from fedrouter.serving.engine import Engine
from fedrouter.serving.errors import ApiError, ClientGone
from fedrouter.serving.gateway import VllmGateway
from fedrouter.serving.handlers import (
    Call,
    Serving,
    ServingChat,
    ServingCompletion,
    health_report,
    model_descriptions,
    model_routes,
    playground_file,
    playground_page,
)
from fedrouter.serving.middleware import MAX_BODY, AccessLog, Guard, access_notes
from fedrouter.serving.options import ServeOptions
from fedrouter.serving.protocol import ChatRequest, CompletionRequest, ErrorResponse
from fedrouter.serving.router import Router

__all__ = [
    "MAX_BODY",
    "AccessLog",
    "ApiError",
    "ChatRequest",
    "ClientGone",
    "CompletionRequest",
    "Guard",
    "create_app",
    "health_report",
    "model_descriptions",
    "model_routes",
]

# Every path answers its errors in one shape (FastAPI's own 422 never happens: a bad body is a 400).
ERRORS = {
    "4XX": {"model": ErrorResponse, "description": "the request cannot be answered as sent: OpenAI's error shape"},
    "5XX": {"model": ErrorResponse, "description": "the server cannot answer now: OpenAI's error shape"},
}
STREAMED = {200: {"description": "the answer; with `stream`, server-sent events", "content": {"text/event-stream": {}}}}
NOT_READY = {503: {"description": "not ready: the same report, its status `starting`, `failed` or `stopped`"}}
routes = APIRouter(responses=ERRORS)


def _call(http: Request) -> Call:
    return Call(partial(_gone, http.receive), access_notes(http))


async def _gone(receive) -> None:
    """Returns once the client has gone: after the body (read before a handler runs), the ASGI server's next
    message is ``http.disconnect``, sent when the connection closes (or the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass


@routes.post("/v1/chat/completions", responses=STREAMED)
async def chat_completions(body: ChatRequest, http: Request) -> Response:
    return await http.app.state.chat.create(body, _call(http))


@routes.post("/v1/completions", responses=STREAMED)
async def completions(body: CompletionRequest, http: Request) -> Response:
    return await http.app.state.completion.create(body, _call(http))


@routes.get("/v1/models")
async def models(http: Request) -> dict:
    return http.app.state.serving.models.listing()


@routes.get("/health", responses=NOT_READY)
async def health(http: Request) -> JSONResponse:
    serving = http.app.state.serving
    status, report = health_report(serving.engine, serving.router)
    return JSONResponse(report, status_code=status)


@routes.get("/", response_class=HTMLResponse)
async def playground() -> FileResponse:
    return playground_page()


@routes.get("/playground/{name}")
async def playground_asset(name: str) -> FileResponse:
    return playground_file(name)


@asynccontextmanager
async def lifespan(app: FastAPI):
    serving = app.state.serving
    serving.engine.start(asyncio.get_running_loop())
    yield
    serving.engine.stop()
    if serving.gateway is not None:
        await serving.gateway.close()


def create_app(router: Router, options: ServeOptions | None = None, *, gateway: VllmGateway | None = None) -> FastAPI:
    """The app, serving under ``options`` (default ``ServeOptions()``); with ``gateway`` the answers come from a
    vLLM server and this process only embeds and routes."""
    options = options or ServeOptions()
    serving = Serving(router, Engine(router, options), gateway)
    app = FastAPI(title="FedRouter", version=fedrouter.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving, app.state.engine = serving, serving.engine
    app.state.chat, app.state.completion = ServingChat(serving), ServingCompletion(serving)
    errors.install(app)
    app.add_middleware(Guard, api_key=options.api_key)
    app.add_middleware(AccessLog)  # it sees every answer, the guard's and the error handlers'
    app.include_router(routes)
    return app
