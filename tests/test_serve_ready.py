"""`fedrouter serve`'s options reach the engine, it is ready only when it says so, a failed engine answers 503 at
once, and every request leaves one access line (tiny random model; in process and as the real command)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ANCHORS, Server, write_tiny_router
from fastapi.testclient import TestClient

from fedrouter import Router, discovery
from fedrouter.cli import build_parser
from fedrouter.errors import ConfigError
from fedrouter.model.loading import load_base_model
from fedrouter.serving.api import create_app
from fedrouter.serving.options import ServeOptions

CHAT = "/v1/chat/completions"
SECRET = "zanzibar-quokka"  # in prompts only: it must never reach a log


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_router(tmp_path_factory.mktemp("ready"), load_base_model("tiny-random", precision="fp32"))


def _chat(content: str = ANCHORS[0], **fields) -> dict:
    return {"model": "fedrouter", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def _wait_for(client, status: str, timeout: float = 120.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/health")
        if response.json()["status"] == status:
            return response
        time.sleep(0.05)
    raise AssertionError(f"/health never said {status!r}: {response.json()}")


def _until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- the options: one object, every flag in it, checked once ----------------------------------------------------


def test_every_serve_flag_reaches_the_options_and_the_defaults_are_the_options():
    parser = build_parser()
    flags = "--host 0.0.0.0 --port 9001 --api-key k --max-batch 3 --max-queue 5 --max-batch-tokens 77"
    flags += " --backend vllm --vllm-url http://x:1 --vllm-model m --request-timeout 7"
    args = parser.parse_args(["serve", "RUN", *flags.split()])
    options = ServeOptions.of(vars(args))
    assert options == ServeOptions("0.0.0.0", 9001, "k", 3, 5, 77, "vllm", "http://x:1", "m", 7.0)
    assert all(getattr(options, f) != getattr(ServeOptions(), f) for f in ServeOptions.__dataclass_fields__)
    # Every other flag says what to load, not how to serve; a new serve flag must be added to ServeOptions.
    defaults = vars(parser.parse_args(["serve", "RUN"]))
    assert set(defaults) - set(ServeOptions.__dataclass_fields__) == {
        "command",
        "run_dir",
        "model",
        "force_base",
        "precision",
        "fallback",  # the router's fallback (Router.load), like the model: what to load
        "fallback_factor",
    }
    assert ServeOptions.of(defaults) == ServeOptions(api_key=defaults["api_key"])


def test_bad_options_are_refused_with_one_line_each():
    with pytest.raises(ConfigError) as refused:
        ServeOptions(max_batch=0, max_queue=-1, max_batch_tokens=True, port=70000, request_timeout=0)
    lines = str(refused.value).splitlines()
    assert lines == [
        "max_batch (--max-batch) is 0: expected a whole number of at least 1",
        "max_queue (--max-queue) is -1: expected a whole number of at least 1",
        "max_batch_tokens (--max-batch-tokens) is True: expected a whole number of at least 1",
        "port (--port) is 70000: expected 1 to 65535",
        "request_timeout (--request-timeout) is 0: expected seconds above 0, at most 3600",
    ]
    with pytest.raises(ConfigError, match="--backend vllm needs --vllm-url"):
        ServeOptions(backend="vllm")


def test_serve_with_a_small_max_batch_tokens_never_batches_two_requests(run_dir, tmp_path):
    """Each request is ~35 prompt tokens + 40: two of them (150 positions) exceed 100, so the engine decodes
    them one at a time, each token in its own step; a request wider than the limit alone still runs."""
    server = Server(run_dir, tmp_path / "serve.log", "--max-batch-tokens", "100")
    try:
        assert server.health()["max_batch_tokens"] == 100
        before = server.health()["steps"]
        answers: list[httpx.Response] = []

        def ask(content: str) -> None:
            answers.append(httpx.post(server.url + CHAT, json=_chat(content, max_tokens=40), timeout=120))

        threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in ANCHORS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [200] * 3
        tokens = [a.json()["usage"]["completion_tokens"] for a in answers]
        health = server.health()
        assert health["peak_batch"] == 1
        # Batched, rows would share steps; one at a time, each row's tokens after its first take their own step.
        assert health["steps"] - before >= sum(tokens) - len(tokens)
        alone = httpx.post(server.url + CHAT, json=_chat(max_tokens=120), timeout=120)
        assert alone.status_code == 200 and alone.json()["usage"]["completion_tokens"] > 0
    finally:
        server.stop()


# -- ready when it says so --------------------------------------------------------------------------------------


def test_health_says_ready_only_after_the_embedding_space_is_computed(run_dir, monkeypatch):
    gate, computed = threading.Event(), []
    real = discovery.embedding_space

    def slow_space(base, settings):
        assert gate.wait(60)
        space = real(base, settings)
        computed.append(space)
        return space

    monkeypatch.setattr(discovery, "embedding_space", slow_space)
    with TestClient(create_app(Router.load(run_dir))) as client:
        starting = client.get("/health")
        assert starting.status_code == 503 and starting.json()["status"] == "starting" and not computed
        answered: list[httpx.Response] = []
        early = threading.Thread(target=lambda: answered.append(client.post(CHAT, json=_chat())))
        early.start()  # sent while starting: it waits in the queue and is answered once ready
        _until(lambda: client.get("/health").json()["queue"] == 1)
        time.sleep(0.3)
        assert not answered and client.get("/health").json()["status"] == "starting"
        gate.set()
        ready = _wait_for(client, "ready")
        assert ready.status_code == 200 and computed and ready.json()["ready_after_s"] > 0
        early.join(60)
        assert answered[0].status_code == 200


def test_the_real_server_answers_503_starting_then_ready(run_dir, tmp_path):
    """Polled from the moment the process starts: every answer before ready is 503 'starting'."""
    from fedrouter.deploy import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "fedrouter.cli", "serve", str(run_dir), "--port", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen: list[tuple[int, str]] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not seen or seen[-1][0] != 200):
            assert process.poll() is None, log.read_text()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                seen.append((response.status_code, response.json()["status"]))
            except httpx.TransportError:
                time.sleep(0.02)
        assert seen and seen[-1] == (200, "ready")
        assert set(seen[:-1]) <= {(503, "starting")}
        deadline = time.monotonic() + 10  # the access line is written once the answer is sent
        while "GET /health 200" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert text.index("ready in") < text.rindex("GET /health 200")
        assert text.count("GET /health 503") == len(seen) - 1
    finally:
        process.terminate()
        process.wait(30)


# -- an engine that fails ---------------------------------------------------------------------------------------


def _failing_router(run_dir, gate: threading.Event) -> Router:
    """A router whose engine dies while starting, as one with a broken adapter would when loading it."""
    router = Router.load(run_dir)

    def broken_batch():
        assert gate.wait(60)
        raise ValueError("adapter cluster_1: lora_A is [4, 32], the model needs [8, 64]")

    router.batch = broken_batch
    return router


def _is_unavailable(response: httpx.Response) -> bool:
    error = response.json()["error"]
    return (
        response.status_code == 503
        and error["type"] == "server_error"
        and error["code"] == "engine_unavailable"
        and "lora_A is [4, 32]" in error["message"]
    )


def test_an_engine_that_fails_at_start_fails_health_and_every_request_at_once(run_dir):
    gate = threading.Event()
    with TestClient(create_app(_failing_router(run_dir, gate))) as client:
        waiting: list[httpx.Response] = []
        early = threading.Thread(target=lambda: waiting.append(client.post(CHAT, json=_chat())))
        early.start()  # queued while starting: told as soon as the engine fails
        _until(lambda: client.get("/health").json()["queue"] == 1)
        gate.set()
        early.join(10)
        assert not early.is_alive() and _is_unavailable(waiting[0])
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "lora_A is [4, 32]" in health.json()["error"]
        started = time.perf_counter()
        for body in (_chat(), _chat(stream=True)):
            assert _is_unavailable(client.post(CHAT, json=body))
        streamed = client.post("/v1/completions", json={"prompt": "x", "stream": True})
        assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "engine_unavailable"
        assert time.perf_counter() - started < 5
        assert client.get("/v1/models").status_code == 200  # what needs no engine still answers


def test_an_engine_that_dies_while_serving_fails_its_requests_and_health(run_dir):
    class Killed(BaseException):  # not an Exception: what a failed step's handler does not catch
        pass

    router = Router.load(run_dir)
    with TestClient(create_app(router)) as client:
        _wait_for(client, "ready")
        assert client.post(CHAT, json=_chat()).status_code == 200

        def dead(prompts, routes):
            raise Killed("the worker was killed")

        router.choose = dead
        died = client.post(CHAT, json=_chat())
        assert died.status_code == 503 and "Killed: the worker was killed" in died.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        assert client.post(CHAT, json=_chat()).status_code == 503


# -- the access log ---------------------------------------------------------------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_every_request_leaves_one_access_line_without_its_text(run_dir):
    lines = _Lines()
    access = logging.getLogger("fedrouter.access")
    access.addHandler(lines)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        with TestClient(create_app(Router.load(run_dir), ServeOptions(api_key="k"))) as client:
            _wait_for(client, "ready")
            lines.lines.clear()
            key = {"Authorization": "Bearer k"}
            ok = client.post(CHAT, json=_chat(f"{SECRET} {ANCHORS[1]}"), headers=key)
            streamed = client.post(CHAT, json=_chat(SECRET, stream=True, max_tokens=3), headers=key)
            client.post(CHAT, json=_chat(SECRET, model="gpt\n4 200 forged"), headers=key)  # 404: no forged line
            client.post(CHAT, json=_chat(SECRET))  # 401
            client.post(CHAT, content=b'{"messages": [', headers={**key, "Content-Type": "application/json"})
            client.get("/v1/models", headers=key)
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    assert ok.status_code == 200 and streamed.status_code == 200
    usage = ok.json()["usage"]
    assert len(lines.lines) == 6 and all("\n" not in line for line in lines.lines)
    assert lines.lines[0].startswith(
        f"POST {CHAT} 200 model=fedrouter adapter=cluster_1 prompt_tokens={usage['prompt_tokens']} "
        f"completion_tokens={usage['completion_tokens']} ms="
    )
    assert (
        lines.lines[1].startswith(f"POST {CHAT} 200 model=fedrouter adapter=")
        and "completion_tokens=3" in lines.lines[1]
    )
    assert lines.lines[2].startswith(f"POST {CHAT} 404 model=gpt?4?200?forged adapter=-")
    assert [line.split()[2] for line in lines.lines[3:]] == ["401", "400", "200"]
    assert all(float(line.rsplit("ms=", 1)[1]) >= 0 for line in lines.lines)
    assert not any(SECRET in line for line in lines.lines)
