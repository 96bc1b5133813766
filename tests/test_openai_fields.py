"""The OpenAI fields that users' tools send, through the real `fedrouter serve` and the official `openai` client
(tiny random model): each accepted one has its effect, each unsupported one is refused naming it, and no client
can make the server hang or lie (a disconnect frees its place, the queue limit holds, bad text is a 400)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from conftest import ANCHORS, Server, write_tiny_router
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedrouter import Router
from fedrouter.model.decoding import Sampling
from fedrouter.model.loading import load_base_model
from fedrouter.serving.engine import READY, Engine, QueueFull, Request
from fedrouter.serving.options import ServeOptions
from fedrouter.serving.router import Route

MAX_QUEUE = 2
REQUEST_TIMEOUT_S = 5  # --request-timeout, short for its test (the default is 30)
CHAT = "/v1/chat/completions"
# The tiny random model answers this greedily by repeating a few tokens: what a penalty must change.
REPEATS = [{"role": "user", "content": ANCHORS[0]}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_router(tmp_path_factory.mktemp("fields"), load_base_model("tiny-random", precision="fp32"))


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    served = Server(
        run_dir,
        tmp_path_factory.mktemp("logs") / "serve.log",
        *("--max-queue", str(MAX_QUEUE), "--request-timeout", str(REQUEST_TIMEOUT_S)),
    )
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _tokens(response) -> list[str]:
    return [entry.token for entry in response.choices[0].logprobs.content]


def _repeated(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


def _until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- accepted, with their effect ---------------------------------------------------------------------------------


def test_penalties_stop_a_greedy_answer_repeating_itself(client):
    def answer(**penalty):
        return client.chat.completions.create(model="base", messages=REPEATS, max_tokens=16, logprobs=True, **penalty)

    plain = answer()
    assert _repeated(_tokens(plain)) >= 4  # the premise: unpenalized, greedy repeats itself
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = answer(**penalty)
        assert penalized.choices[0].message.content != plain.choices[0].message.content
        assert _repeated(_tokens(penalized)) < _repeated(_tokens(plain)), penalty
        assert len(_tokens(penalized)) == penalized.usage.completion_tokens == 16
    # A mild penalty is still a penalty, and a negative one rewards repeating (no fewer repeats than none).
    assert _repeated(_tokens(answer(frequency_penalty=-2.0))) >= _repeated(_tokens(plain))


def test_penalties_apply_to_sampled_decoding_too(client):
    """At a low temperature sampling repeats itself as greedy does; penalized, it does less, reproducibly."""

    def sample(**penalty) -> list[str]:
        response = client.chat.completions.create(
            model="base", messages=REPEATS, max_tokens=16, temperature=0.05, seed=5, logprobs=True, **penalty
        )
        return _tokens(response)

    penalized = sample(frequency_penalty=2.0)
    assert penalized == sample(frequency_penalty=2.0)
    assert _repeated(penalized) < _repeated(sample()) and _repeated(sample()) >= 4


def test_chat_logprobs_one_per_token_at_most_zero_and_top_sorted(client):
    response = client.chat.completions.create(
        model="fedrouter", messages=REPEATS, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    for entry in content:
        assert entry.logprob <= 0
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and all(lp <= 0 for lp in top)
        # Greedy: the chosen token is the most likely one, so it leads its own top list.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
    # The tokens' bytes spell the answer.
    spelled = b"".join(bytes(entry.bytes) for entry in content).decode()
    assert spelled.strip() == response.choices[0].message.content
    # Without top_logprobs: each token's own log-probability only; without logprobs: none at all.
    bare = client.chat.completions.create(model="fedrouter", messages=REPEATS, max_tokens=8, logprobs=True)
    assert [e.logprob for e in bare.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(model="fedrouter", messages=REPEATS, max_tokens=2).choices[0].logprobs is None


def test_streamed_logprobs_come_with_their_chunks_and_match_the_whole_answer(client):
    whole = client.chat.completions.create(
        model="fedrouter", messages=REPEATS, max_tokens=8, logprobs=True, top_logprobs=2
    )
    chunks = list(
        client.chat.completions.create(
            model="fedrouter",
            messages=REPEATS,
            max_tokens=8,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert with_text and all(c.choices[0].logprobs.content for c in with_text)  # each piece brings its tokens'
    # include_usage: one last chunk with the usage and no choices.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])


def test_legacy_completions_logprobs_whole_and_streamed(client):
    response = client.completions.create(model="fedrouter", prompt=ANCHORS[1], max_tokens=6, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens == 6
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(
        len(top) <= 2 and max(top.values()) >= lp
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    chunks = list(
        client.completions.create(
            model="fedrouter",
            prompt=ANCHORS[1],
            max_tokens=6,
            logprobs=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == logprobs.tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert client.completions.create(model="fedrouter", prompt="x", max_tokens=2).choices[0].logprobs is None
    # A boolean, as chat's field takes: false asks for none (not for 0 alternatives), true for the chosen tokens'.
    off = client.completions.create(model="fedrouter", prompt="x", max_tokens=2, extra_body={"logprobs": False})
    assert off.choices[0].logprobs is None
    on = client.completions.create(model="fedrouter", prompt="x", max_tokens=2, extra_body={"logprobs": True})
    assert len(on.choices[0].logprobs.token_logprobs) == on.usage.completion_tokens
    assert all(not top for top in on.choices[0].logprobs.top_logprobs or [])


def test_response_format_text_and_user_are_accepted_and_change_nothing(client):
    plain = client.chat.completions.create(model="fedrouter", messages=REPEATS, max_tokens=6)
    same = client.chat.completions.create(
        model="fedrouter", messages=REPEATS, max_tokens=6, response_format={"type": "text"}, user="end-user-7"
    )
    assert same.choices[0].message.content == plain.choices[0].message.content
    legacy = client.completions.create(model="fedrouter", prompt=ANCHORS[0], max_tokens=3, user="u")
    assert legacy.usage.completion_tokens == 3


# -- refused, naming the field -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="fedrouter", messages=REPEATS, max_tokens=2, **fields)
    assert refused.value.param == param and refused.value.type == "invalid_request_error"
    assert refused.value.body["message"].startswith(param)


def test_every_error_is_openai_shaped_json(server):
    def error(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status and response.headers["content-type"] == "application/json"
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return body

    headers = {"Content-Type": "application/json"}
    # A lone surrogate is valid in a JSON escape but is no text: refused, where it would once give a plain 500.
    lone = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}'
    assert error(httpx.post(server.url + CHAT, content=lone, headers=headers), 400)["param"] == "messages.0.content"
    lone_prompt = b'{"prompt": ["\\udfff"], "max_tokens": 2}'
    assert error(httpx.post(server.url + "/v1/completions", content=lone_prompt, headers=headers), 400)["param"] == (
        "prompt.0"
    )
    lone_key = b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}'
    error(httpx.post(server.url + CHAT, content=lone_key, headers=headers), 400)
    error(httpx.post(server.url + CHAT, content=b"\xff\xfe{", headers=headers), 400)  # not UTF-8 at all
    assert error(httpx.get(server.url + "/v1/nothing-here"), 404)["code"] == "not_found"
    assert error(httpx.get(server.url + CHAT), 405)["code"] == "method_not_allowed"
    assert server.health()["status"] == "ready"


# -- a server that cannot be made to hang or lie -----------------------------------------------------------------


def _held_stream(server: Server, statuses: list[int], release: threading.Event) -> None:
    """A long streamed answer, held open (its place taken) until ``release``."""
    body = {"model": "fedrouter", "prompt": ANCHORS[0], "max_tokens": 900, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        statuses.append(response.status_code)
        release.wait(60)


def test_the_queue_limit_counts_every_admitted_request(server):
    """MAX_QUEUE + 3 long answers at once, each held open: MAX_QUEUE are admitted, the others get 429, and the
    engine never holds more (requests being embedded and routed count too)."""
    assert server.health()["max_queue"] == MAX_QUEUE
    statuses: list[int] = []
    release = threading.Event()
    threads = [threading.Thread(target=_held_stream, args=(server, statuses, release)) for _ in range(MAX_QUEUE + 3)]
    for t in threads:
        t.start()
    try:
        assert _until(lambda: len(statuses) == len(threads), 60)
        assert sorted(statuses) == [200] * MAX_QUEUE + [429] * 3
        assert server.health()["queue"] == MAX_QUEUE
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert _until(lambda: server.health()["queue"] == 0, 30)


def test_a_request_being_embedded_and_routed_holds_its_place(run_dir):
    """In the engine alone, with routing held up: the request taken from the queue still counts."""
    router = Router.load(run_dir)
    engine = Engine(router, ServeOptions(max_queue=2))
    loop = asyncio.new_event_loop()  # never run: the engine's events just wait in it
    engine.start(loop)
    routing, release = threading.Event(), threading.Event()
    try:
        assert _until(lambda: engine.state == READY, 120)
        choose = router.choose

        def held_up(prompts, routes):
            routing.set()
            assert release.wait(30)
            return choose(prompts, routes)

        router.choose = held_up
        requests = [Request(p, router.encode(p, 2), Route(), Sampling(2)) for p in ANCHORS]
        engine.submit(requests[0])
        assert routing.wait(30) and engine.load == 1  # taken from the queue, being routed: still counted
        engine.submit(requests[1])
        with pytest.raises(QueueFull):
            engine.submit(requests[2])
        release.set()
        assert _until(lambda: engine.load == 0, 30) and engine.served == 2
    finally:
        release.set()
        engine.stop()
        loop.close()


def test_a_client_that_disconnects_before_its_whole_answer_frees_its_place(server):
    before = server.health()
    body = {"model": "fedrouter", "prompt": ANCHORS[0], "max_tokens": 900}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # not streaming: it gives up waiting and closes its connection
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    # Its row is cancelled (not finished: 900 tokens take longer) and its place is free at once.
    assert _until(lambda: server.health()["cancelled"] == before["cancelled"] + 1, 10)
    assert server.health()["queue"] == 0 and time.monotonic() - started < 10
    assert server.health()["served"] == before["served"] + 1
    # Both places are free again: MAX_QUEUE held answers are admitted.
    statuses: list[int] = []
    release = threading.Event()
    threads = [threading.Thread(target=_held_stream, args=(server, statuses, release)) for _ in range(MAX_QUEUE)]
    for t in threads:
        t.start()
    try:
        assert _until(lambda: len(statuses) == MAX_QUEUE, 60) and statuses == [200] * MAX_QUEUE
    finally:
        release.set()
        for t in threads:
            t.join(60)
    assert _until(lambda: server.health()["queue"] == 0, 30)


def test_uvicorn_bounds_headers_and_connections(server):
    settings = ServeOptions(max_queue=MAX_QUEUE).uvicorn()
    assert issubclass(settings["http"], H11Protocol) and settings["limit_concurrency"] > MAX_QUEUE
    assert settings["timeout_keep_alive"] > 0 and settings["timeout_graceful_shutdown"] > 0
    # h11 refuses headers once more than the limit is buffered and still incomplete (one read may hold a little
    # more whole): 1 MiB of header is refused by uvicorn itself, not held.
    # The client may still be sending when the 400 and the close come: it sees the status or a reset.
    with contextlib.suppress(httpx.TransportError):
        assert httpx.get(server.url + "/health", headers={"X-Big": "a" * (1 << 20)}).status_code == 400
    assert _until(lambda: "Invalid HTTP request received" in server.log.read_text(), 10)
    assert server.health()["status"] == "ready"


def _whole_response(connection: socket.socket) -> bytes:
    """One HTTP response read off a raw socket: its head, then as many body bytes as its Content-Length says (the
    two may come in separate reads)."""

    def more() -> bytes:
        got = connection.recv(65536)
        assert got, "the server closed the connection before its whole response"
        return got

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += more()
    return head + b"\r\n\r\n" + body


def test_a_request_that_never_finishes_arriving_is_cut_off(server):
    """uvicorn holds such a connection for ever; the server closes it ``--request-timeout`` after it began,
    whatever part of the request is missing, and a slow request that does arrive in time is answered."""
    address = ("127.0.0.1", server.port)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = json.dumps({"model": "fedrouter", "prompt": ANCHORS[0], "max_tokens": 2}).encode()
    partial = [
        b"",  # connected, sent nothing
        b"POST /v1/compl",  # half a request line
        head,  # headers without their end
        head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10],  # a body shorter than its length
    ]
    started = time.monotonic()
    connections = [socket.create_connection(address) for _ in partial]
    for connection, sent in zip(connections, partial, strict=True):
        connection.sendall(sent)
    # A whole request, then half of a second one on the same kept-alive connection.
    kept = socket.create_connection(address)
    kept.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    kept.settimeout(60)
    assert _whole_response(kept).startswith(b"HTTP/1.1 200")  # all of it: the next read must see the close
    kept.sendall(b"GET /hea")
    for connection in [*connections, kept]:
        connection.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            assert connection.recv(65536) == b""  # closed by the server
        connection.close()
    assert time.monotonic() - started >= REQUEST_TIMEOUT_S  # by the deadline, not before
    # A request whose body comes in two parts within the deadline is answered.
    with socket.create_connection(address) as slow:
        slow.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(REQUEST_TIMEOUT_S / 3)
        slow.sendall(body[10:])
        slow.settimeout(60)
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")
    assert server.health()["status"] == "ready"


def test_stream_chunks_are_valid_json_to_the_end(server):
    body = {"model": "fedrouter", "messages": REPEATS, "max_tokens": 4, "stream": True, "logprobs": True}
    response = httpx.post(server.url + CHAT, json=body, timeout=60)
    assert response.status_code == 200
    lines = response.text.splitlines()
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and all(isinstance(json.loads(d), dict) for d in data[:-1])
