"""`fedrouter serve` as a real process on loopback, called with the official `openai` client (tiny random model)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import ANCHORS, Server, write_tiny_router

from fedrouter import Router
from fedrouter.model.loading import load_base_model

KEY = "test-key-123"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_tiny_router(tmp_path_factory.mktemp("served"), load_base_model("tiny-random", precision="fp32"))


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    served = Server(run_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--api-key", KEY, "--max-queue", "3")
    yield served
    served.stop()
    assert served.process.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def router(run_dir):
    return Router.load(run_dir)


def _routing(response) -> dict:
    return response.model_extra["fedrouter"]


def test_models_lists_every_routing_choice(client):
    models = client.models.list().data
    assert [m.id for m in models] == [
        "fedrouter",
        "fedrouter-local:0",
        "fedrouter-local:1",
        "cluster_0",
        "cluster_1",
        "cluster_2",
        "base",
    ]
    # Each says what it is; an adapter's description is its cluster's name (the tiny router's are its ids).
    described = {m.id: m.model_extra["description"] for m in models}
    assert described["fedrouter-local:1"] == "routes each prompt by client 1's local clusters"
    assert [described[f"cluster_{g}"] for g in range(3)] == ["cluster_0", "cluster_1", "cluster_2"]


def test_chat_answers_as_router_generate_with_the_adapter_it_names(client, router):
    for g, prompt in enumerate(ANCHORS):
        raw = client.chat.completions.with_raw_response.create(
            model="fedrouter", messages=[{"role": "user", "content": prompt}], max_tokens=6
        )
        response = raw.parse()
        expected = router.generate([prompt], max_new_tokens=6)[0]
        assert response.choices[0].message.content == expected.text
        assert response.choices[0].finish_reason == "length"
        assert response.usage.completion_tokens == 6 and response.usage.prompt_tokens == expected.prompt_tokens
        routing = _routing(response)
        assert routing["adapter"] == f"cluster_{g}" == raw.headers["x-fedrouter-adapter"] == routing["name"]
        assert routing["routing"] == "global" and len(routing["distances"]) == 3
        assert float(raw.headers["x-fedrouter-distance"]) == pytest.approx(routing["distance"], rel=1e-4, abs=1e-5)


def test_completions_answer_the_prompt_as_one_user_turn(client, router):
    response = client.completions.create(model="fedrouter", prompt=ANCHORS[1], max_tokens=5)
    assert response.choices[0].text == router.generate([ANCHORS[1]], max_new_tokens=5)[0].text
    assert _routing(response)["adapter"] == "cluster_1"


def test_each_model_choice_routes_as_named(client, router):
    def adapter(model: str, prompt: str) -> str:
        response = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=2
        )
        return _routing(response)["adapter"]

    assert [adapter("fedrouter-local:1", p) for p in ANCHORS] == ["cluster_2"] * 3  # client 1 holds cluster 2 only
    assert [adapter("fedrouter-local:0", p) for p in ANCHORS[:2]] == ["cluster_0", "cluster_1"]
    assert adapter("cluster_2", ANCHORS[0]) == "cluster_2"
    response = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": ANCHORS[0]}], max_tokens=4
    )
    assert _routing(response) == {
        "adapter": "base",
        "name": "base",
        "routing": "base",
        "distance": None,
        "distances": [],
        "fallback": False,
    }
    assert response.choices[0].message.content == router.generate([ANCHORS[0]], mode="base", max_new_tokens=4)[0].text


def test_streaming_sends_the_same_answer_piece_by_piece(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ANCHORS[2]}]
    whole = client.chat.completions.create(model="fedrouter", messages=messages, max_tokens=10)
    chunks = list(
        client.chat.completions.create(
            model="fedrouter", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(chunks) >= 5
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert finals[0].model_extra["fedrouter"]["adapter"] == "cluster_2"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].choices == []
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(prompt=ANCHORS[0], model="fedrouter", max_tokens=6, stream=True)
    )
    assert streamed == client.completions.create(prompt=ANCHORS[0], model="fedrouter", max_tokens=6).choices[0].text


def test_sampling_with_a_seed_is_reproducible(client):
    def sample(seed: int) -> str:
        response = client.chat.completions.create(
            model="fedrouter",
            messages=[{"role": "user", "content": ANCHORS[1]}],
            max_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=seed,
        )
        return response.choices[0].message.content

    assert sample(11) == sample(11) != sample(12)


def test_stop_strings_stop(client):
    messages = [{"role": "user", "content": ANCHORS[0]}]
    full = client.chat.completions.create(model="fedrouter", messages=messages, max_tokens=12).choices[0]
    stop = full.message.content.split()[2]
    cut = client.chat.completions.create(model="fedrouter", messages=messages, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full.message.content[: full.message.content.index(stop)].rstrip()
    assert cut.finish_reason == "stop"


def test_errors_have_their_status_and_say_what_is_wrong(server, client):
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # no key at all
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist; the models are: fedrouter, "):
        client.chat.completions.create(model="gpt-4", messages=user)
    with pytest.raises(openai.BadRequestError, match="logit_bias: unknown or unsupported field"):
        client.chat.completions.create(model="fedrouter", messages=user, logit_bias={"1": 5})
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="fedrouter", messages=user, temperature=5)
    with pytest.raises(openai.BadRequestError, match="n: Input should be 1"):
        client.chat.completions.create(model="fedrouter", messages=user, n=2)
    with pytest.raises(openai.BadRequestError, match="messages.0.role"):
        client.chat.completions.create(model="fedrouter", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="at least one message must have the role 'user'"):
        client.chat.completions.create(model="fedrouter", messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens .* context of 1024 tokens"):
        client.chat.completions.create(model="fedrouter", messages=[{"role": "user", "content": "word " * 1100}])
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    huge = httpx.post(f"{server.url}/v1/completions", content=b"x" * (2 << 20), headers=headers)
    assert huge.status_code == 413
    assert server.health()["status"] == "ready"  # none of it hurt the server


def test_a_full_queue_answers_429_with_retry_after(server):
    """The fixture's server holds 3 requests at most: 8 at once, each long, overflow it."""
    statuses, retry_after = [], []

    def ask() -> None:
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": ANCHORS[0], "max_tokens": 200},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            retry_after.append(response.headers.get("retry-after"))
            assert "too many requests" in response.json()["error"]["message"]

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) >= 3 and 429 in statuses and set(statuses) <= {200, 429}
    assert set(retry_after) == {"1"}
    assert server.health()["peak_batch"] > 1  # under the default --max-batch-tokens they were decoded together


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    before = server.health()
    body = {"model": "fedrouter", "prompt": ANCHORS[0], "max_tokens": 900, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    # The connection is closed: the row stops early, the queue empties.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        server.health()["queue"] == 0 and server.health()["cancelled"] > before["cancelled"]
    ):
        time.sleep(0.2)
    after = server.health()
    assert after["queue"] == 0 and after["cancelled"] == before["cancelled"] + 1
    # Leaving is not an error: the stream ends quietly, with nothing in the log but its access line.
    assert "Exception in ASGI application" not in server.log.read_text()


def test_serve_refuses_bad_arguments_before_loading_anything(tmp_path, run_dir):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedrouter.cli", "serve", *args], capture_output=True, text=True)

    missing = serve(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no router artifact" in missing.stderr
    gateway = serve(str(run_dir), "--backend", "vllm")
    assert gateway.returncode == 2 and "--backend vllm needs --vllm-url" in gateway.stderr
    queue = serve(str(run_dir), "--max-queue", "0")
    assert (
        queue.returncode == 2 and "max_queue (--max-queue) is 0: expected a whole number of at least 1" in queue.stderr
    )


def test_requests_join_the_batch_in_order_while_its_padded_size_fits():
    from fedrouter.model.decoding import Sampling
    from fedrouter.serving.engine import Engine, Request
    from fedrouter.serving.options import ServeOptions
    from fedrouter.serving.router import Route

    engine = Engine(None, ServeOptions(max_batch=3, max_batch_tokens=1000))  # admission needs no model
    lengths = [90, 90, 700, 90, 90, 90, 90]  # + 10 answer tokens each
    requests = [Request("x", [0] * n, Route(), Sampling(max_new_tokens=10)) for n in lengths]
    for request in requests:
        engine.submit(request)

    def take(*running: int) -> list[int]:
        return [lengths[requests.index(r)] for r in engine._take([requests[i] for i in running], block=False)]

    assert take() == [90, 90]  # 2 x 100 fits, 3 x 710 does not
    assert take(0, 1) == []  # the long one waits while the two short ones are decoded
    assert take() == [700]  # then goes alone
    assert take(2) == []  # and nothing joins it
    assert take() == [90, 90, 90]  # max_batch rows
    assert take(3, 4) == [90]  # a finished row's place goes to the next request
    assert take() == []


def test_a_seed_out_of_range_is_refused_before_it_reaches_the_model(client):
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.chat.completions.create(
            model="fedrouter", messages=[{"role": "user", "content": "x"}], temperature=1.0, seed=2**70
        )
