"""The serving engine: one worker thread that owns the model and answers requests in batches.

Requests arrive from the web server's event loop (``submit``) and wait in a bounded queue. The worker decodes
continuously (``decoding.Batch``): between two tokens it takes what is waiting, as far as the batch has room
(``max_batch`` rows, ``max_batch_tokens`` positions), embeds and routes those prompts together and lets them join
the rows already being decoded, whatever their adapters; a row that finishes leaves at once and its place goes
to the next request. Each request gets its route as soon as it is known, then its text piece by piece (for
streaming) and its completion, all through thread-safe callbacks into the event loop.

A request holds its place in the queue (``max_queue``) from ``submit`` until its answer is done: while it waits,
while it is being embedded and routed, and while it is decoded. A request that is cancelled (its client went
away) leaves the queue at once, or finishes its row at the next token when it is already being decoded; either
way its place is free.

The engine is ``starting`` until its thread has done everything a first request would otherwise wait for
(``_warm_up``), then ``ready``. A thread that cannot start, fails while warming up or dies later leaves it
``failed``: every request waiting or being answered gets an ``unavailable`` event and ``submit`` refuses new ones
(``Unavailable``) instead of queueing them for a worker that will never come.
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
from fedrouter.serving.options import ServeOptions
from fedrouter.serving.router import Choice, Prompt, Route, Router

log = logging.getLogger(__name__)

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
WARM_UP_PROMPT = "Say hello."  # embedded and answered once at start-up; never shown to anyone


class QueueFull(RuntimeError):
    """The engine holds ``max_queue`` requests already: try again later."""


class Unavailable(RuntimeError):
    """The engine cannot answer: it failed (the message says why) or the server is shutting down."""


@dataclass(eq=False)  # compared and hashed by identity
class Request:
    prompt: Prompt
    ids: list[int]  # the encoded prompt (``Router.encode``)
    route: Route
    sampling: decoding.Sampling
    stream: bool = False  # send its text piece by piece (and its log-probabilities with each piece, if asked)
    # Filled in by the engine, read on the event loop through ``events``:
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


# What a request's ``events`` queue receives, in order: ("route", Choice), then, when it streams, ("text", str)
# pieces (each after a ("logprobs", tuple[TokenLogprob, ...]) of its tokens, when the sampling asks for them),
# then ("done", Completion) or ("error", message); or, at any point, ("unavailable", message): the engine failed.


class Engine:
    """The worker thread and its queue, under ``options``' limits (``max_batch``, ``max_queue``,
    ``max_batch_tokens``: validated by ``ServeOptions``, read nowhere else)."""

    def __init__(self, router: Router, options: ServeOptions | None = None) -> None:
        self.router = router
        self.options = options or ServeOptions()
        self._waiting: deque[Request] = deque()
        self._running: dict[decoding.Row, Request] = {}  # the rows being decoded and their requests
        self._admitting: list[Request] = []  # taken from the queue, being embedded and routed: not rows yet
        self._lock = threading.Condition()
        self._stopping = False
        self._state = STARTING
        self.failure: str | None = None  # why the engine is ``failed``
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = time.perf_counter()
        self.ready_after_s: float | None = None  # from ``start`` to ``ready``
        self.steps = 0  # decoding steps (for /health and the load test)
        self.served = 0
        self.cancelled = 0  # rows finished early because their client went away
        self.peak_batch = 0  # the most rows decoded together in one step

    # -- the event loop's side --------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="fedrouter-engine", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as err:  # no thread for it (resource limits): fail now, not on the first request
            self._fail(f"the engine thread cannot start: {err}")

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def state(self) -> str:
        """``starting``, ``ready``, ``failed`` (``failure`` says why) or ``stopped``."""
        with self._lock:
            if self._state == READY and not (self._thread and self._thread.is_alive()):
                self._state, self.failure = FAILED, self.failure or "the engine thread is gone"
            return self._state

    @property
    def load(self) -> int:
        """Requests waiting or being answered (embedded, routed or decoded)."""
        with self._lock:
            return len(self._waiting) + len(self._admitting) + len(self._running)

    def check(self) -> None:
        """``Unavailable`` when the engine failed or is stopping: nothing sent to it would be answered."""
        with self._lock:  # re-entrant: ``state`` takes it too
            state = self.state
            if state == FAILED:
                raise Unavailable(self._unavailable())
            if self._stopping or state == STOPPED:
                raise Unavailable("the server is shutting down")

    def submit(self, request: Request) -> None:
        """Queue ``request`` (also while starting: it is answered once ready); ``Unavailable`` when the engine
        failed or is stopping, ``QueueFull`` past ``max_queue``."""
        with self._lock:
            self.check()
            if self.load >= self.options.max_queue:
                raise QueueFull(f"{self.options.max_queue} requests are already waiting or being answered")
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
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(request.events.put_nowait, (kind, value))

    def _unavailable(self) -> str:
        return f"the engine is not running: {self.failure}"

    def _fail(self, reason: str) -> None:
        """The engine is ``failed``: every request it holds is told so at once, and no new one is taken."""
        with self._lock:
            self._state, self.failure = FAILED, reason[:500]
            held = list({id(r): r for r in [*self._waiting, *self._admitting, *self._running.values()]}.values())
            self._waiting.clear()
            self._admitting.clear()
            self._running.clear()
        for request in held:
            self._emit(request, "unavailable", self._unavailable())

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
            while self._waiting and len(running) + len(taken) < self.options.max_batch:
                wider = max(width, self._width(self._waiting[0]))
                rows = len(running) + len(taken) + 1
                # The batch's cache is as wide as its longest row: rows x the longest (prompt + answer) stays
                # under this bound, so a few long prompts cannot make it too large for memory. Alone, it runs.
                if rows > 1 and wider * rows > self.options.max_batch_tokens:
                    break
                taken.append(self._waiting.popleft())
                width = wider
            self._admitting = list(taken)  # still counted by ``load`` until they are rows
            return taken

    @staticmethod
    def _width(request: Request) -> int:
        return len(request.ids) + request.sampling.max_new_tokens

    def _run(self) -> None:
        try:
            batch = self._warm_up()
            with self._lock:
                self._state = READY
                self.ready_after_s = time.perf_counter() - self._started
            log.info("ready in %.1f s: adapters loaded, embedding space and chat heads computed", self.ready_after_s)
            self._decode(batch)
        except BaseException as err:  # whatever stops the worker must reach the callers
            log.exception("the engine stopped")
            self._fail(f"{type(err).__name__}: {err}")
            return
        with self._lock:
            self._state = STOPPED

    def _warm_up(self) -> decoding.Batch:
        """Everything a first request would otherwise wait for, done before the engine says it is ready: every
        adapter loaded into its slot, the embedding space computed (its reference scales: seconds to minutes the
        first time on a model, then read from the disk cache) with one prompt embedded, and the chat template's
        head's keys and values computed for the base model and every adapter by a one-token answer each (its
        prefill)."""
        batch = self.router.batch()
        self.router.choose([WARM_UP_PROMPT], [Route("global")])
        ids = self.router.encode(WARM_UP_PROMPT, 1)
        slots = [self.router.slot(a) for a in (None, *range(self.router.num_adapters))]
        rows = [decoding.Row(ids, slot, decoding.Sampling(max_new_tokens=1)) for slot in slots]
        self.router.decode(rows, max_rows=self.options.max_batch)
        return batch

    def _decode(self, batch: decoding.Batch) -> None:
        """The serving loop, until ``stop``."""
        while (taken := self._take(list(self._running.values()), block=not len(batch))) is not None:
            try:
                admitted = self._admit(batch, taken)
                self.peak_batch = max(self.peak_batch, len(batch))
                finished = admitted + batch.step()
            except Exception as err:  # one failed step must not stop the server: its requests get the error
                log.exception("decoding failed")
                batch.fail()
                with self._lock:
                    failed = {id(r): r for r in [*taken, *self._running.values()]}.values()
                    self._admitting.clear()
                    self._running.clear()
                for request in failed:
                    self._emit(request, "error", f"generation failed: {type(err).__name__}: {err}")
                continue
            except BaseException:  # the worker dies: the requests it took go back, for ``_fail`` to tell
                with self._lock:
                    self._admitting.clear()
                    self._waiting.extendleft(reversed(taken))
                raise
            self.steps += 1
            self._finish(finished)

    def _admit(self, batch: decoding.Batch, taken: list[Request]) -> list:
        live = [r for r in taken if not r.cancelled.is_set()]
        if not live:
            with self._lock:
                self._admitting.clear()
            return []
        choices: list[Choice] = self.router.choose([r.prompt for r in live], [r.route for r in live])
        rows = []
        for request, choice in zip(live, choices, strict=True):
            self._emit(request, "route", choice)
            streams, logprobs = request.stream, request.sampling.logprobs is not None
            row = decoding.Row(
                request.ids,
                self.router.slot(choice.adapter),
                request.sampling,
                on_text=(lambda piece, r=request: self._emit(r, "text", piece)) if streams else None,
                on_logprobs=(lambda got, r=request: self._emit(r, "logprobs", got)) if streams and logprobs else None,
                cancelled=request.cancelled.is_set,
            )
            with self._lock:
                self._running[row] = request
            rows.append(row)
        with self._lock:
            self._admitting.clear()
        return batch.add(rows)

    def _finish(self, finished: list) -> None:
        for row, done in finished:
            with self._lock:
                request = self._running.pop(row)
            self.served += 1
            self.cancelled += done.finish_reason == "cancelled"
            self._emit(request, "done", done)
