"""The real `fedrouter serve` fuzzed from its own `/openapi.json` with Schemathesis (tiny random model).

Every operation of the schema gets generated requests, bodies that fit the schema and (for the operations that take
a body) bodies that do not: none may get a 5xx or take longer than `REQUEST_S`, and afterwards the server answers a
chat exactly as before and is healthy, with no request left holding a place in its queue. Hypothesis is derandomized
(the same requests every run); `FEDROUTER_FUZZ_EXAMPLES` raises the number of requests per operation for a deeper
run.
"""

from __future__ import annotations

import os
import time
from collections import Counter

import httpx
import openai
import pytest
import requests
import schemathesis
from conftest import ANCHORS, Server, write_tiny_router
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from fedrouter.model.loading import load_base_model

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("FEDROUTER_FUZZ_EXAMPLES", "25"))  # per operation and mode
REQUEST_S = 30.0  # an answer of at most `BUDGET` tokens takes well under a second: past this, the request hung
BUDGET = 4  # tokens: the server's default (128) or a budget up to the context is seconds per request on a slow CPU
CONTEXT = 1024  # the tiny model's: a larger budget is refused at once, so it is sent as generated
BUDGETS = ("max_tokens", "max_completion_tokens")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = write_tiny_router(tmp_path_factory.mktemp("fuzz"), load_base_model("tiny-random", precision="fp32"))
    served = Server(run_dir, tmp_path_factory.mktemp("logs") / "serve.log", "--api-key", KEY)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _ask(client) -> tuple[str, str]:
    response = client.chat.completions.create(
        model="fedrouter", messages=[{"role": "user", "content": ANCHORS[1]}], max_tokens=6
    )
    return response.choices[0].message.content, response.model_extra["fedrouter"]["adapter"]


def _small_budget(body: object) -> None:
    """Keep an answer short: a budget the model would spend seconds on becomes `BUDGET` (none: the default 128)."""
    if not isinstance(body, dict):
        return
    for name in BUDGETS:
        value = body.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool) and BUDGET < value <= CONTEXT:
            body[name] = BUDGET
    if all(body.get(name) is None for name in BUDGETS):
        body["max_tokens"] = BUDGET


def _fuzz(operation, mode: GenerationMode, url: str, sent: Counter) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,  # each request is bounded by REQUEST_S instead
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failing request is reported as it was sent
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        _small_budget(case.body)
        started = time.perf_counter()
        try:
            response = case.call(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=REQUEST_S)
        except requests.Timeout:
            pytest.fail(f"{operation.label} hung: no answer in {REQUEST_S} s to {case.body!r}")
        elapsed = time.perf_counter() - started
        sent[(operation.label, mode.value, response.status_code)] += 1
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, response.text
        assert elapsed < REQUEST_S, f"{operation.label} took {elapsed:.1f} s"

    fuzz()


def test_no_generated_request_gets_a_server_error_or_hangs(server, client):
    before = _ask(client)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions", "GET /health"}
    sent: Counter = Counter()
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.body else [])
        for mode in modes:
            _fuzz(operation, mode, server.url, sent)
    answered = {label for label, mode, status in sent if mode == "positive" and status == 200}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models"} <= answered, sent
    # What it once found: a temperature so small that the logits divided by it overflowed (a 500 for the whole batch).
    found = {"prompt": ["_r"], "max_tokens": BUDGET, "temperature": 1.2817610489826107e-63, "top_p": 5e-324}
    answer = httpx.post(f"{server.url}/v1/completions", json=found, headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200, answer.text
    # Unharmed: the same answer from the same adapter, healthy, nothing left in the queue.
    assert _ask(client) == before
    deadline = time.monotonic() + 10
    while server.health()["queue"] and time.monotonic() < deadline:
        time.sleep(0.1)
    health = httpx.get(f"{server.url}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ready" and health.json()["queue"] == 0
    print(f"fuzzed with {sum(sent.values())} requests: {sorted(sent.items())}")
