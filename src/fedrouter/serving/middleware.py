"""The ASGI middleware around ``fedrouter serve``'s app: the guard and the access log.

``Guard`` refuses a body over ``MAX_BODY`` or without a length, and a missing or wrong API key on ``/v1/``, before
anything reads the body. ``AccessLog`` writes one line per request on the ``fedrouter.access`` logger once its
response is sent: method, path, status and the notes the handlers add (``access_notes``: model, adapter, token
counts), never a prompt or an answer.
"""

from __future__ import annotations

import hmac
import logging
import time

from starlette.requests import Request

from fedrouter.serving.errors import ApiError

MAX_BODY = 1 << 20
NOTES = "fedrouter_access"  # the key of a request's access-log notes in its ASGI scope's state
NOTED = ("model", "adapter", "prompt_tokens", "completion_tokens")

access_log = logging.getLogger("fedrouter.access")


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
            return self.key_refusal(headers.get("authorization", ""))
        return None

    def key_refusal(self, given: str) -> ApiError | None:
        if hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return None
        return ApiError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer KEY')",
            kind="authentication_error",
            code="invalid_api_key",
        )


class AccessLog:
    """ASGI middleware: one line per HTTP request on the ``fedrouter.access`` logger once its response is sent
    (a stream's once it ended), errors included: method, path, status, model, adapter, prompt and completion
    tokens, latency in ms. The handlers add only what ``NOTED`` names; a prompt or an answer is never logged."""

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


def access_notes(http: Request) -> dict[str, object]:
    """This request's access-log notes, for the handlers to add ``NOTED`` fields to."""
    return http.scope.setdefault("state", {}).setdefault(NOTES, {})


def access_line(scope, status: int, notes: dict, seconds: float) -> str:
    raw = scope.get("raw_path") or scope.get("path", "").encode()
    noted = " ".join(f"{name}={_printable(str(notes.get(name, '-')), 64)}" for name in NOTED)
    return (
        f"{scope.get('method', '-')} {_printable(raw.decode('latin-1'), 200)} {status} {noted} ms={seconds * 1000:.1f}"
    )


def _printable(text: str, limit: int) -> str:
    """One field of a log line: no space, line break or control character a caller could forge lines with."""
    clean = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "") or "-"
