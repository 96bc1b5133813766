"""Chats train on every assistant turn under the chat template; single-turn prompts are exactly as before."""

import json

import pytest
from conftest import SHARED_DATA

from fedrouter.model.prompts import chat_ids, prompt_ids, render_chat, training_ids

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Sort these words: pear, fig"},
    {"role": "assistant", "content": "fig, pear"},
    {"role": "user", "content": "Now these: kiwi, apple"},
]


def _trained(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])


def test_a_chat_trains_on_every_assistant_turn_and_its_end(tiny_base):
    tokenizer = tiny_base.tokenizer
    ids, labels = training_ids(tokenizer, CHAT, "apple, kiwi", 256)
    end = tokenizer.eos_token
    assert _trained(tokenizer, ids, labels) == f"fig, pear{end}apple, kiwi{end}"
    # The ids are the template's own rendering of the whole chat, answer and end token appended.
    assert ids == chat_ids(tokenizer, CHAT) + tokenizer("apple, kiwi", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))


def test_a_long_chat_loses_its_oldest_turns_first_never_the_system_prompt(tiny_base):
    tokenizer = tiny_base.tokenizer
    long_chat = [
        CHAT[0],
        *[{"role": role, "content": f"turn {i} " + "word " * 20} for i in range(6) for role in ("user", "assistant")],
        CHAT[3],
    ]
    budget = len(chat_ids(tokenizer, [CHAT[0], *long_chat[-3:]])) + 2
    ids = prompt_ids(tokenizer, long_chat, budget)
    text = tokenizer.decode(ids)
    assert len(ids) <= budget
    assert "Answer briefly." in text and "Now these: kiwi, apple" in text and "turn 5" in text
    assert "turn 0" not in text
    assert text.startswith(render_chat(tokenizer, [CHAT[0]]).split("Answer briefly.")[0])


def test_a_chat_whose_last_turn_alone_is_too_long_keeps_its_template_whole(tiny_base):
    tokenizer = tiny_base.tokenizer
    chat = [CHAT[0], {"role": "user", "content": "Summarize: " + "the cat sat on a long mat, and went on. " * 40}]
    head = render_chat(tokenizer, [CHAT[0]]).split("Answer briefly.")[0]
    for budget in (48, 64, 100, 200):
        ids = prompt_ids(tokenizer, chat, budget)
        text = tokenizer.decode(ids)
        assert len(ids) <= budget and text.startswith(head + "Answer briefly.") and "Summarize: the cat" in text
        assert text.endswith(render_chat(tokenizer, [{"role": "user", "content": "x"}]).split("x")[-1])


def _v2_prompt_ids(tokenizer, instruction: str, budget: int) -> list[int]:
    """The prompt of a single-turn sample as the commit of the v2 benchmark records built it (frozen copy)."""

    def ids_of(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(text):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    ids = ids_of(render(instruction))
    if len(ids) <= budget:
        return ids
    inner = ids_of(instruction)
    keep = max(budget - (len(ids) - len(inner)) - 1, 8)
    head = (keep * 3) // 4
    shortened = tokenizer.decode(inner[:head]) + " … " + tokenizer.decode(inner[len(inner) - (keep - head) :])
    return ids_of(render(shortened))[-budget:]


@pytest.mark.skipif(not (SHARED_DATA / "paper4-raw").is_dir(), reason="needs ../shared/data")
def test_single_turn_prompts_and_answers_are_the_v2_records_own(tiny_base):
    """Same tokens for every budget the v2 protocol used (training 256 tokens, evaluation 256 + 48 - 48)."""
    tokenizer = tiny_base.tokenizer
    rows = [json.loads(line) for line in (SHARED_DATA / "paper4-raw" / "test.jsonl").read_text().splitlines()]
    rows = rows[::25]
    shortened = 0
    for row in rows:
        for budget in (64, 256):
            want = _v2_prompt_ids(tokenizer, row["instruction"], budget)
            assert prompt_ids(tokenizer, row["instruction"], budget) == want
            shortened += len(want) == budget
        answer = [*tokenizer(row["response"], add_special_tokens=False)["input_ids"][:128], tokenizer.eos_token_id]
        ids, labels = training_ids(tokenizer, row["instruction"], row["response"], 256)
        prompt = _v2_prompt_ids(tokenizer, row["instruction"], 256 - len(answer))
        assert (ids, labels) == (prompt + answer, [-100] * len(prompt) + answer)
    assert shortened > 0  # the shortening path ran too
