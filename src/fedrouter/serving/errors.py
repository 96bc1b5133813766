"""Every error of ``fedrouter serve``'s API in OpenAI's shape, mapped in one place.

``ApiError`` is an error a handler raises (status, message, ``type``, ``param``, ``code``, headers) and the one
response shape every path answers with: ``{"error": {"message", "type", "param", "code"}}``. The functions below
turn what FastAPI, Starlette and the engine raise into one: a body that does not validate (``invalid_body``),
Starlette's own 404/405 (``http_error``), a full queue, an engine that cannot answer, anything unforeseen (500, no
detail). ``install`` registers them on an app.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

# Fields of OpenAI's API that this server cannot honour, refused by name (any other unknown field is refused too).
UNSUPPORTED = {
    "tools": "tool calls are not supported",
    "tool_choice": "tool calls are not supported",
    "parallel_tool_calls": "tool calls are not supported",
    "functions": "function calls are not supported",
    "function_call": "function calls are not supported",
}


class ClientGone(Exception):
    """The caller closed its connection before its answer was ready."""


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``status`` and ``{"error": {"message", "type", "param", "code"}}``."""

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
        message, param = unicode_safe(message), None if param is None else unicode_safe(param)
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unicode_safe(text: str) -> str:
    """``text`` with any lone surrogate (valid in JSON's escapes, not in UTF-8) written ``?``: safe to send."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


# -- the errors handlers raise ------------------------------------------------------------------------------------


def unavailable(message: str) -> ApiError:
    """The engine failed or the server is shutting down: 503 at once."""
    return ApiError(503, message, kind="server_error", code="engine_unavailable")


def queue_full(message: str) -> ApiError:
    return ApiError(
        429, f"too many requests: {message}", kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
    )


def model_not_found(name: str, models: Sequence[str]) -> ApiError:
    message = f"model {name!r} does not exist; the models are: {', '.join(models)}"
    return ApiError(404, message, param="model", code="model_not_found")


def generation_failed(message: str) -> ApiError:
    return ApiError(500, message, kind="server_error")


INTERNAL = ApiError(500, "internal server error", kind="server_error", code="internal_error")
CLIENT_GONE = ApiError(499, "the client closed the connection", code="client_closed_request")  # nginx's status


# -- what FastAPI and Starlette raise, as OpenAI's errors -----------------------------------------------------------


def invalid_body(errors: Sequence[dict]) -> ApiError:
    """A body that failed validation (pydantic's ``errors``): 400 naming the field and what is wrong with it."""
    # A union (``prompt``: a string or a list) fails once per member: the error a value check raised says most.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    where = field_name(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {first.get('msg')} ({first.get('ctx', {}).get('error', '')})"
        return ApiError(400, message, param=None, code="invalid_json")
    if first.get("type") == "extra_forbidden":
        return unknown_field(where)
    return ApiError(400, f"{where}: {first.get('msg')}", param=where, code="invalid_value")


def unknown_field(where: str) -> ApiError:
    if where in UNSUPPORTED:
        return ApiError(400, f"{where}: {UNSUPPORTED[where]} by this server", param=where, code="unsupported_parameter")
    return ApiError(400, f"{where}: unknown or unsupported field", param=where, code="unknown_field")


def field_name(loc: tuple) -> str:
    """The field an error is about, as a caller names it: without pydantic's tags for the member of a union that
    failed (``str``, ``list[TextPart]``, ``function-after[...]``)."""
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (p == "str" or "[" in p))]
    return ".".join(parts) or "body"


def http_error(method: str, path: str, err: HTTPException) -> ApiError:
    """Starlette's own errors (an unknown path, a method a path does not take, a body it could not read)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = f"{method} {path[:200]}: {err.detail}"
    return ApiError(err.status_code, message, code=codes.get(err.status_code), headers=err.headers)


# -- the app's exception handlers -----------------------------------------------------------------------------------


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return err.response()


async def _client_gone(request: Request, err: ClientGone) -> Response:
    return CLIENT_GONE.response()  # nobody reads it


async def _http_error(request: Request, err: HTTPException) -> Response:
    return http_error(request.method, request.url.path, err).response()


async def _internal_error(request: Request, err: Exception) -> Response:
    return INTERNAL.response()  # what went wrong stays in the server's log


async def _invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    return invalid_body(err.errors()).response()


def install(app: FastAPI) -> None:
    """Answer every error ``app`` raises in OpenAI's shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
