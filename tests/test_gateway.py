"""Gateway mode: `fedrouter serve --backend vllm` routes and forwards to a stub vLLM server on loopback.

No real vLLM runs here (it needs a GPU): the stub records every request it receives and answers in OpenAI's shape.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import openai
import pytest
from conftest import ANCHORS, Server, write_tiny_router

from fedrouter.model.loading import load_base_model


class StubVllm(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict]]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubVllm.received.append((self.path, body))
        if body["model"] == "cluster_0" and body.get("max_tokens") == 13:  # the test's way to ask for a failure
            self._send(500, "application/json", b'{"error": "CUDA out of memory"}')
            return
        chat = self.path == "/v1/chat/completions"
        text = f"answer from {body['model']}"
        if body.get("stream"):
            pieces = [text[:6], text[6:]]
            events = []
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                choice = {"index": 0, "finish_reason": "stop" if last else None}
                choice |= {"delta": {"content": piece}} if chat else {"text": piece}
                events.append(f"data: {json.dumps({'id': 'x', 'model': body['model'], 'choices': [choice]})}\n\n")
            events.append("data: [DONE]\n\n")
            self._send(200, "text/event-stream", "".join(events).encode())
            return
        choice = {"index": 0, "finish_reason": "stop"}
        choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        answer = {"id": "x", "object": "chat.completion", "model": body["model"], "choices": [choice]}
        self._send(200, "application/json", json.dumps(answer).encode())

    def _send(self, status: int, kind: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubVllm)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(stub, tmp_path_factory):
    run_dir = write_tiny_router(tmp_path_factory.mktemp("gw"), load_base_model("tiny-random", precision="fp32"))
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    served = Server(run_dir, log, "--backend", "vllm", "--vllm-url", stub, "--vllm-model", "HuggingFaceTB/base")
    yield openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=60)
    served.stop()


def test_each_request_goes_to_the_adapter_the_router_chose(client):
    StubVllm.received.clear()
    for g, prompt in enumerate(ANCHORS):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        response = client.chat.completions.create(model="fedrouter", messages=messages, max_tokens=7, seed=3)
        assert response.choices[0].message.content == f"answer from cluster_{g}"
        assert response.model == "fedrouter" and response.model_extra["fedrouter"]["adapter"] == f"cluster_{g}"
        path, body = StubVllm.received[-1]
        assert path == "/v1/chat/completions"
        assert body == {
            "model": f"cluster_{g}",
            "messages": messages,
            "max_tokens": 7,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 3,
            "n": 1,
            "stream": False,
        }
    client.completions.create(model="base", prompt=ANCHORS[0], max_tokens=5, stop=["\n"])
    path, body = StubVllm.received[-1]
    assert path == "/v1/completions" and body["model"] == "HuggingFaceTB/base" and body["stop"] == ["\n"]
    assert body["prompt"] == ANCHORS[0]


def test_streams_pass_through_with_the_routing_on_the_last_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="fedrouter-local:1", messages=[{"role": "user", "content": ANCHORS[0]}], max_tokens=4, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "answer from cluster_2"
    assert all(c.model == "fedrouter-local:1" for c in chunks)
    assert chunks[-1].model_extra["fedrouter"]["adapter"] == "cluster_2"
    assert StubVllm.received[-1][1]["stream"] is True


def test_a_backend_failure_is_a_502_that_says_so(client):
    with pytest.raises(openai.InternalServerError, match="the vLLM backend answered 500: .*CUDA out of memory"):
        client.chat.completions.create(model="cluster_0", messages=[{"role": "user", "content": "x"}], max_tokens=13)
    with pytest.raises(openai.NotFoundError):  # validation still happens here, before anything is forwarded
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
