"""uvicorn's h11 protocol with a deadline for each request to arrive.

uvicorn bounds a request's headers in size and an idle keep-alive connection in time, but nothing in the time a
request takes to arrive: a client that opens a connection and sends nothing, or half a request line, or headers
without their end, or a body shorter than its Content-Length, holds the connection (and a place under
``limit_concurrency``) for ever. ``TimedH11Protocol`` closes a connection whose request has not fully arrived
``request_timeout`` seconds after the connection opened or after the request's first byte; once a request is
complete, uvicorn's own limits take over again (the answer may take as long as it takes, and the keep-alive
timeout bounds the wait for the next request). A request cut off this way reaches the app as a client that
went away.

uvicorn has no such setting (its ``timeout_keep_alive`` starts only after a response), hence this subclass; it
uses the protocol's documented constructor and h11's public connection state only.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_ARRIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)  # the client's side once its request is in


class TimedH11Protocol(H11Protocol):
    """An h11 connection that must deliver each whole request within ``request_timeout`` seconds."""

    request_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()  # a new connection must send its first request in time

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in _ARRIVED:
            self._disarm()
        elif self._deadline is None:  # the first bytes of the next request on a kept-alive connection
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.request_timeout, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.conn.their_state in _ARRIVED:
            return
        log.info(
            "closed a connection from %s: its request had not arrived after %.0f s", self.client, self.request_timeout
        )
        self.transport.close()


def timed_protocol(request_timeout: float) -> type[TimedH11Protocol]:
    """``TimedH11Protocol`` with this deadline (uvicorn builds one protocol object per connection from a class)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"request_timeout": request_timeout})
