"""Router.generate: mixed-adapter batches, chats, sampling with seeds, stop strings, budgets (tiny random model)."""

import numpy as np
import pytest
from conftest import ANCHORS, write_tiny_router

from fedrouter import Router
from fedrouter.model import decoding, lora
from fedrouter.model.loading import load_base_model
from fedrouter.model.prompts import prompt_ids
from fedrouter.serving.artifact import RouterArtifact
from fedrouter.serving.router import PromptTooLong, Route, routing_text


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    run_dir = write_tiny_router(tmp_path_factory.mktemp("router"), load_base_model("tiny-random", precision="fp32"))
    return Router(RouterArtifact.load(run_dir), load_base_model("tiny-random", precision="fp32"))


def test_each_anchor_routes_to_its_cluster_in_both_modes(router):
    assert list(router.route(list(ANCHORS))) == [0, 1, 2]
    # Client 0 holds clusters 0 and 1 only: the review goes to the nearer of those two.
    local = router.route(list(ANCHORS), mode="local", client=0)
    assert list(local[:2]) == [0, 1] and local[2] in (0, 1)
    assert list(router.route(list(ANCHORS), mode="local", client=1)) == [2, 2, 2]


def test_a_mixed_batch_answers_as_each_adapter_alone(router):
    """One batch with three adapters and the base model gives each prompt the answer of its adapter alone."""
    answers = router.generate(list(ANCHORS), max_new_tokens=6)
    base_answer = router.generate([ANCHORS[0]], mode="base", max_new_tokens=6)[0]
    assert [a.adapter for a in answers] == [0, 1, 2] and base_answer.adapter is None
    alone = load_base_model("tiny-random", precision="fp32")  # each adapter in the trained slot, one row at a time

    def decoded_alone(prompt: str, slot: str) -> str:
        return decoding.decode(alone, [decoding.Row(router.encode(prompt, 6), slot, decoding.Sampling(6))])[0].text

    for prompt, answer in zip(ANCHORS, answers, strict=True):
        lora.set_adapter(alone, router.artifact.adapters[answer.adapter])
        assert decoded_alone(prompt, lora.SLOT) == answer.text
        assert answer.finish_reason == "length" and answer.completion_tokens == 6
    assert decoded_alone(ANCHORS[0], decoding.BASE) == base_answer.text
    # The adapters differ, so the routing matters to the text.
    assert (
        len({router.generate([ANCHORS[0]], mode="cluster", cluster=g, max_new_tokens=6)[0].text for g in range(3)}) == 3
    )


def test_rows_join_and_leave_between_tokens_and_get_the_answers_they_get_alone(router):
    """Continuous batching: a much longer prompt joins two tokens in, a third row one token later; each row leaves
    when its budget is spent, the cache loses the columns only the long row needed, and every answer is the one
    its row gets decoded alone."""
    prompts, budgets = [ANCHORS[0], " ".join([ANCHORS[1]] * 6), ANCHORS[2]], [5, 4, 12]

    def rows() -> list[decoding.Row]:
        return [
            decoding.Row(router.encode(p, n), router.slot(g), decoding.Sampling(n))
            for g, (p, n) in enumerate(zip(prompts, budgets, strict=True))
        ]

    alone = [router.decode([row])[0] for row in rows()]
    batch, joined, done, widths = router.batch(), rows(), {}, []

    def collect(finished) -> None:
        done.update({joined.index(row): completion for row, completion in finished})
        widths.append(batch.width)

    collect(batch.add([joined[0]]))
    for _ in range(2):
        collect(batch.step())
    collect(batch.add([joined[1]]))
    collect(batch.step())
    collect(batch.add([joined[2]]))
    assert len(batch) == 3 and batch.width >= len(joined[1].ids)
    while len(batch):
        collect(batch.step())
    assert [done[i] for i in range(3)] == alone
    assert [c.completion_tokens for c in alone] == budgets and {c.finish_reason for c in alone} == {"length"}
    long_gone = widths.index(max(widths)) + [w < max(widths) for w in widths[widths.index(max(widths)) :]].index(True)
    assert widths[long_gone] < len(joined[1].ids)  # the long row left and its padding columns with it
    assert batch.width == 0 and batch.add([]) == [] and batch.step() == []


def test_the_chat_template_head_is_prefilled_once_per_adapter_and_changes_no_answer(router):
    """Prompts that start with the template's head reuse its cached keys and values, also when two of them of
    different lengths share a prefill (padding then sits between the head and their own tokens); a chat with
    its own system message does not start with the head and is prefilled whole. Same answers as without it."""
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ANCHORS[1]}]
    prompts = [ANCHORS[0], ANCHORS[0] + " Quickly, please.", system]

    def rows() -> list[decoding.Row]:
        return [decoding.Row(router.encode(p, 6), router.slot(g), decoding.Sampling(6)) for g, p in enumerate(prompts)]

    router._load_slots()
    plain = decoding.decode(router.base, rows())  # no prefix
    # A store of its own: the router's is shared by every batch, and other tests have filled it.
    batch, shared = decoding.Batch(router.base, router.batch().prefix), rows()
    head = len(batch.prefix)
    assert head > 10 and [tuple(r.ids[:head]) == batch.prefix for r in shared] == [True, True, False]
    assert len(decoding._prefill_groups(shared[:2], head)) == 1  # one prefill, padded inside
    finished = batch.add(shared)
    while len(batch):
        finished += batch.step()
    assert [dict(finished)[r] for r in shared] == plain
    assert sorted(batch._prefixes) == [router.slot(0), router.slot(1)]


def test_a_one_token_budget_finishes_in_the_prefill(router):
    batch = router.batch()
    row = decoding.Row(router.encode(ANCHORS[0], 1), router.slot(0), decoding.Sampling(1))
    [(finished, completion)] = batch.add([row])
    assert finished is row and completion.completion_tokens == 1 and len(batch) == 0


def test_a_chat_routes_by_its_last_user_turn_and_is_answered_whole(router):
    chat = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": ANCHORS[0]},
        {"role": "assistant", "content": "apple, fig, kiwi, pear"},
        {"role": "user", "content": ANCHORS[2]},
    ]
    assert routing_text(chat) == ANCHORS[2]
    answer = router.generate([chat], max_new_tokens=4)[0]
    single = router.generate([ANCHORS[2]], max_new_tokens=4)[0]
    assert answer.adapter == 2 and answer.distance == pytest.approx(0.0, abs=1e-3)
    assert answer.prompt_tokens > single.prompt_tokens + 10  # every turn is in the prompt
    with pytest.raises(ValueError, match="at least one user message"):
        router.generate([[{"role": "system", "content": "hi"}]])
    with pytest.raises(ValueError, match="message 0: expected a role"):
        router.generate([[{"role": "robot", "content": "hi"}, {"role": "user", "content": "x"}]])


def test_a_seed_makes_sampling_reproducible_whatever_shares_the_batch(router):
    first = router.generate([ANCHORS[1]], temperature=1.0, seed=7, max_new_tokens=8)[0].text
    again = router.generate([ANCHORS[1]], temperature=1.0, seed=7, max_new_tokens=8)[0].text
    other = router.generate([ANCHORS[1]], temperature=1.0, seed=8, max_new_tokens=8)[0].text
    greedy = router.generate([ANCHORS[1]], max_new_tokens=8)[0].text
    assert first == again and first != other and first != greedy
    # The same seeded row beside two other rows of other adapters draws the same tokens.
    ids = router.encode(ANCHORS[1], 8)
    sampled = decoding.Row(ids, router.slot(1), decoding.Sampling(8, temperature=1.0, seed=7))
    others = [
        decoding.Row(router.encode(p, 8), router.slot(g), decoding.Sampling(8))
        for g, p in ((0, ANCHORS[0]), (2, ANCHORS[2]))
    ]
    assert router.decode([others[0], sampled, others[1]])[1].text == first


def test_stop_strings_end_the_answer_before_them(router):
    full = router.generate([ANCHORS[0]], max_new_tokens=12)[0]
    words = full.text.split()
    assert len(words) >= 4, full.text
    stop = words[2]
    cut = router.generate([ANCHORS[0]], max_new_tokens=12, stop=[stop, "never appears"])[0]
    assert cut.text == full.text[: full.text.index(stop)].rstrip() and cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_streamed_pieces_add_up_to_the_answer(router):
    pieces: list[str] = []
    row = decoding.Row(router.encode(ANCHORS[2], 10), router.slot(2), decoding.Sampling(10), on_text=pieces.append)
    done = router.decode([row])[0]
    assert len(pieces) >= 3 and "".join(pieces) == done.text


def test_a_cancelled_row_stops_while_the_others_go_on(router):
    steps = []
    gone = decoding.Row(
        router.encode(ANCHORS[0], 20),
        router.slot(0),
        decoding.Sampling(20),
        on_text=steps.append,
        cancelled=lambda: len(steps) >= 2,
    )
    stays = decoding.Row(router.encode(ANCHORS[1], 20), router.slot(1), decoding.Sampling(20))
    first, second = router.decode([gone, stays])
    assert first.finish_reason == "cancelled" and first.completion_tokens < 5
    assert second.finish_reason == "length" and second.completion_tokens == 20


def test_prompts_past_the_context_are_refused_with_their_length(router):
    long = "word " * 1200
    with pytest.raises(PromptTooLong, match=r"the prompt is \d+ tokens and max_tokens is 8.*context of 1024"):
        router.generate([long], max_new_tokens=8)
    assert len(router.encode("short", 8)) == len(prompt_ids(router.base.tokenizer, "short", 1024))


def test_sampling_settings_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        decoding.Sampling(temperature=3.0)
    with pytest.raises(ValueError, match="top_p"):
        decoding.Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoding.Sampling(max_new_tokens=0)
    with pytest.raises(ValueError, match="stop"):
        decoding.Sampling(stop=("",))


def test_each_answer_names_its_adapter(router):
    # The tiny router was written without names: each cluster's name is its id.
    assert router.names == ["cluster_0", "cluster_1", "cluster_2"]
    answers = router.generate([ANCHORS[2], ANCHORS[0]], max_new_tokens=1)
    assert [(a.adapter, a.name) for a in answers] == [(2, "cluster_2"), (0, "cluster_0")]
    assert router.generate([ANCHORS[0]], mode="base", max_new_tokens=1)[0].name == "base"


def test_distances_are_to_every_global_centroid(router):
    choice = router.choose([ANCHORS[1]], [Route("global")])[0]
    expected = np.linalg.norm(router.embed([ANCHORS[1]])[0] - router.artifact.global_centroids, axis=1)
    np.testing.assert_allclose(choice.distances, expected, rtol=1e-5, atol=1e-4)
    assert choice.adapter == 1 and choice.distance == min(choice.distances)


def test_prompts_are_prefilled_in_groups_of_similar_length():
    rows = [decoding.Row([0] * n, decoding.BASE) for n in (300, 10, 50, 12, 11, 40)]
    groups = decoding._prefill_groups(rows)
    # Padding to a group's longest prompt stays within 25% of its rows' own tokens.
    assert [[len(r.ids) for r in g] for g in groups] == [[10, 11, 12], [40, 50], [300]]


def test_penalties_and_logprobs_through_router_generate(router):
    """``Router.generate`` takes the penalties and log-probabilities ``fedrouter serve`` takes (the same loop)."""
    plain, logged = (router.generate([ANCHORS[0]], mode="base", max_new_tokens=16, logprobs=k)[0] for k in (None, 3))
    assert plain.logprobs == () and logged.text == plain.text  # asking for them changes no answer
    assert len(logged.logprobs) == logged.completion_tokens
    for token in logged.logprobs:
        assert token.logprob <= 0 and len(token.top) == 3
        assert token.top[0][0] == token.token  # greedy: the chosen token is the most likely one
        assert [p for _, p in token.top] == sorted((p for _, p in token.top), reverse=True)
    penalized = router.generate([ANCHORS[0]], mode="base", max_new_tokens=16, frequency_penalty=2.0)[0]
    assert penalized.text != plain.text  # the tiny model repeats a few tokens greedily: a penalty must change it
    with pytest.raises(ValueError, match="presence_penalty"):
        router.generate([ANCHORS[0]], presence_penalty=3.0)
