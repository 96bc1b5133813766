"""The serving engine: one worker thread that owns the model and answers requests in batches.

Requests arrive from the web server's event loop (``submit``) and wait in a bounded queue. The worker decodes
continuously (``decoding.Batch``): between two tokens it takes what is waiting, as far as the batch has room
(``max_batch`` rows, ``max_batch_tokens`` positions), embeds and routes those prompts together and lets them join
the rows already being decoded, whatever their adapters; a row that finishes leaves at once and its place goes
to the next request. Each request gets its route as soon as it is known, then its text piece by piece (for
streaming) and its completion, all through thread-safe callbacks into the event loop.

A request that is cancelled (its client went away) leaves the queue at once, or finishes its row at the next
token when it is already being decoded; either way its place is free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fedrouter.model import decoding
from fedrouter.serving.router import Choice, Prompt, Route, Router

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine holds ``max_queue`` requests already: try again later."""


@dataclass(eq=False)  # compared and hashed by identity
class Request:
    prompt: Prompt
    ids: list[int]  # the encoded prompt (``Router.encode``)
    route: Route
    sampling: decoding.Sampling
    # Filled in by the engine, read on the event loop through ``events``:
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


# What a request's ``events`` queue receives, in order: ("route", Choice), then ("text", str) pieces,
# then ("done", Completion) or ("error", message).


class Engine:
    def __init__(
        self, router: Router, *, max_batch: int = 16, max_queue: int = 64, max_batch_tokens: int = 8192
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_batch_tokens < 1:
            raise ValueError(
                f"max_batch, max_queue and max_batch_tokens must be at least 1, got {max_batch}, {max_queue}, "
                f"{max_batch_tokens}"
            )
        self.router = router
        self.max_batch = max_batch
        self.max_queue = max_queue
        # The batch's cache is as wide as its longest row: rows x the longest (prompt + answer) stays under this
        # bound, so a few long prompts cannot make it too large for memory. A request alone always runs.
        self.max_batch_tokens = max_batch_tokens
        self._waiting: deque[Request] = deque()
        self._running: dict[decoding.Row, Request] = {}  # the rows being decoded and their requests
        self._lock = threading.Condition()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps (for /health and the load test)
        self.served = 0
        self.cancelled = 0  # rows finished early because their client went away

    # -- the event loop's side --------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="fedrouter-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def load(self) -> int:
        """Requests waiting or being answered."""
        with self._lock:
            return len(self._waiting) + len(self._running)

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(self._running) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting or being answered")
            self._waiting.append(request)
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled.set()
        # Waiting: it leaves the queue. Already being decoded: its row finishes at the next token.
        with self._lock, contextlib.suppress(ValueError):
            self._waiting.remove(request)

    # -- the worker's side ------------------------------------------------------------------------------------

    def _emit(self, request: Request, kind: str, value) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(request.events.put_nowait, (kind, value))

    def _take(self, running: list[Request], block: bool) -> list[Request] | None:
        """The waiting requests that join the ``running`` ones now, in arrival order while the batch has room;
        waits for one when ``block`` (nothing is being decoded). None: the engine is stopping."""
        with self._lock:
            while block and not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            taken: list[Request] = []
            width = max((self._width(r) for r in running), default=0)
            while self._waiting and len(running) + len(taken) < self.max_batch:
                wider = max(width, self._width(self._waiting[0]))
                rows = len(running) + len(taken) + 1
                if rows > 1 and wider * rows > self.max_batch_tokens:
                    break
                taken.append(self._waiting.popleft())
                width = wider
            return taken

    @staticmethod
    def _width(request: Request) -> int:
        return len(request.ids) + request.sampling.max_new_tokens

    def _run(self) -> None:
        batch = self.router.batch()
        while (taken := self._take(list(self._running.values()), block=not len(batch))) is not None:
            try:
                finished = self._admit(batch, taken) + batch.step()
            except Exception as err:  # one failed step must not stop the server: its requests get the error
                log.exception("decoding failed")
                batch.fail()
                with self._lock:
                    failed = {id(r): r for r in [*taken, *self._running.values()]}.values()
                    self._running.clear()
                for request in failed:
                    self._emit(request, "error", f"generation failed: {type(err).__name__}: {err}")
                continue
            self.steps += 1
            self._finish(finished)

    def _admit(self, batch: decoding.Batch, taken: list[Request]) -> list:
        live = [r for r in taken if not r.cancelled.is_set()]
        if not live:
            return []
        choices: list[Choice] = self.router.choose([r.prompt for r in live], [r.route for r in live])
        rows = []
        for request, choice in zip(live, choices, strict=True):
            self._emit(request, "route", choice)
            row = decoding.Row(
                request.ids,
                self.router.slot(choice.adapter),
                request.sampling,
                on_text=lambda piece, r=request: self._emit(r, "text", piece),
                cancelled=request.cancelled.is_set,
            )
            with self._lock:
                self._running[row] = request
            rows.append(row)
        return batch.add(rows)

    def _finish(self, finished: list) -> None:
        for row, done in finished:
            with self._lock:
                request = self._running.pop(row)
            self.served += 1
            self.cancelled += done.finish_reason == "cancelled"
            self._emit(request, "done", done)
