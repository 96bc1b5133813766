"""`fedrouter serve`'s handlers and error mapping called directly, without the HTTP app or a server."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from conftest import ANCHORS, write_tiny_router
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from fedrouter.serving.engine import Engine
from fedrouter.serving.errors import ApiError, http_error, invalid_body
from fedrouter.serving.handlers import (
    Call,
    Serving,
    ServingChat,
    ServingCompletion,
    ServingModels,
    health_report,
    playground_file,
)
from fedrouter.serving.options import ServeOptions
from fedrouter.serving.protocol import ChatRequest, CompletionRequest
from fedrouter.serving.router import Route, Router

# What the models and /health read of a router: no model behind it.
ROUTER = SimpleNamespace(clients=[0, 1], num_adapters=2, names=["qqp (92%)", "cluster_1"])


async def _still_here() -> None:
    await asyncio.Event().wait()  # the client never goes away


def _refusal(body: dict, model=ChatRequest) -> dict:
    """The error a body that fails validation gets, as the app's handler maps it."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return invalid_body(caught.value.errors()).body()["error"]


def test_the_models_list_every_routing_with_its_description():
    models = ServingModels(ROUTER)
    listing = models.listing()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    assert list(cards) == ["fedrouter", "fedrouter-local:0", "fedrouter-local:1", "cluster_0", "cluster_1", "base"]
    assert cards["cluster_0"]["description"] == "qqp (92%)" and cards["cluster_0"]["routing"] == "cluster"
    assert {card["owned_by"] for card in cards.values()} == {"fedrouter"}
    assert models.resolve("fedrouter-local:1") == Route("local", client=1)


def test_an_unknown_model_is_a_404_listing_the_models():
    with pytest.raises(ApiError) as caught:
        ServingModels(ROUTER).resolve("gpt-4")
    error = caught.value
    assert error.status == 404 and error.param == "model" and error.code == "model_not_found"
    assert error.message == (
        "model 'gpt-4' does not exist; the models are: fedrouter, fedrouter-local:0, fedrouter-local:1, "
        "cluster_0, cluster_1, base"
    )
    assert json.loads(error.response().body) == error.body()


def test_bodies_that_fail_validation_map_to_openai_errors_naming_the_field():
    user = [{"role": "user", "content": "hi"}]
    assert _refusal({"messages": user, "tools": []}) == {
        "message": "tools: tool calls are not supported by this server",
        "type": "invalid_request_error",
        "param": "tools",
        "code": "unsupported_parameter",
    }
    assert _refusal({"messages": user, "logit_bias": {}})["code"] == "unknown_field"
    assert _refusal({"messages": user, "stop": ""})["message"] == "stop: Value error, a stop string must not be empty"
    lone = _refusal({"prompt": "\ud800"}, CompletionRequest)
    assert lone["param"] == "prompt" and "lone surrogate" in lone["message"]
    broken = invalid_body([{"type": "json_invalid", "loc": ("body", 12), "msg": "JSON decode error"}])
    assert broken.status == 400 and broken.code == "invalid_json" and broken.param is None


def test_starlettes_own_errors_keep_their_status_in_openai_shape():
    missing = http_error("GET", "/nowhere", HTTPException(404, "Not Found"))
    assert missing.status == 404 and missing.code == "not_found" and missing.message == "GET /nowhere: Not Found"
    method = http_error("DELETE", "/v1/models", HTTPException(405, "Method Not Allowed", headers={"Allow": "GET"}))
    assert method.status == 405 and method.code == "method_not_allowed" and method.headers == {"Allow": "GET"}


def test_health_is_503_until_the_engine_is_ready_and_playground_files_are_a_fixed_list():
    status, report = health_report(Engine(ROUTER, ServeOptions(max_queue=5)), ROUTER)
    assert status == 503 and report["status"] == "starting" and report["max_queue"] == 5
    assert report["adapters"] == 2 and report["clients"] == [0, 1] and report["queue"] == 0
    assert playground_file("app.js").media_type == "text/javascript"
    with pytest.raises(ApiError) as caught:
        playground_file("../api.py")
    assert caught.value.status == 404


# -- one chat and one streamed completion on the tiny router, through the engine, without HTTP ------------------------


@pytest.fixture(scope="module")
def router(tmp_path_factory, tiny_base):
    return Router.load(write_tiny_router(tmp_path_factory.mktemp("handlers"), tiny_base))


async def _served(router: Router, ask):
    """``ask(serving)`` with the engine running on this event loop."""
    serving = Serving(router, Engine(router, ServeOptions()))
    serving.engine.start(asyncio.get_running_loop())
    try:
        return await ask(serving)
    finally:
        serving.engine.stop()


def test_a_chat_is_answered_as_router_generate_with_its_routing(router):
    body = ChatRequest(messages=[{"role": "user", "content": ANCHORS[2]}], max_tokens=5)
    call = Call(_still_here)
    response = asyncio.run(_served(router, lambda serving: ServingChat(serving).create(body, call)))
    answer = json.loads(response.body)
    expected = router.generate([ANCHORS[2]], max_new_tokens=5)[0]
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == expected.text
    assert answer["fedrouter"]["adapter"] == "cluster_2" == response.headers["x-fedrouter-adapter"]
    assert answer["usage"]["completion_tokens"] == 5
    tokens = answer["usage"]["prompt_tokens"]
    assert call.notes == {"model": "fedrouter", "adapter": "cluster_2", "prompt_tokens": tokens, "completion_tokens": 5}


def test_a_streamed_completion_ends_with_its_routing_and_done(router):
    body = CompletionRequest(prompt=ANCHORS[0], max_tokens=4, stream=True)

    async def ask(serving):
        response = await ServingCompletion(serving).create(body, Call(_still_here))
        return [line async for line in response.body_iterator]

    lines = asyncio.run(_served(router, ask))
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["fedrouter"]["adapter"] == "cluster_0"
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert text == router.generate([ANCHORS[0]], max_new_tokens=4)[0].text


def test_a_temperature_too_small_to_divide_by_is_greedy_and_fails_nobody_in_its_batch(router):
    """Found by tests/test_fuzz.py: a temperature of 1e-63 overflowed the logits to infinity, and the failed step
    answered 500 to that request and to every request decoded with it."""
    tiny = ChatRequest(messages=[{"role": "user", "content": ANCHORS[1]}], max_tokens=6, temperature=1.28e-63, seed=3)
    other = ChatRequest(messages=[{"role": "user", "content": ANCHORS[0]}], max_tokens=20)
    assert tiny.sampling().greedy and other.sampling().greedy  # decoding.Sampling's rule, for every caller

    async def ask(serving):
        chat = ServingChat(serving)
        return await asyncio.gather(chat.create(other, Call(_still_here)), chat.create(tiny, Call(_still_here)))

    answers = [json.loads(response.body) for response in asyncio.run(_served(router, ask))]
    assert answers[1]["choices"][0]["message"]["content"] == router.generate([ANCHORS[1]], max_new_tokens=6)[0].text
    assert answers[0]["usage"]["completion_tokens"] == 20
