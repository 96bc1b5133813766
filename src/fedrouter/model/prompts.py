"""Turning instructions into token ids: the chat template where the tokenizer has one, bounded in length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

_FALLBACK_HEADINGS = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}
ROLES = tuple(_FALLBACK_HEADINGS)


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> str:
    """A chat (system, user and assistant turns) as the text the model continues with its answer.

    The tokenizer's chat template where it has one; otherwise "### Instruction:" / "### Response:" headings.
    """
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: expected a role in {ROLES} and a text content, got {dict(message)!r}")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    turns = [f"{_FALLBACK_HEADINGS[m['role']]}\n{m['content']}\n\n" for m in messages]
    return "".join(turns) + _FALLBACK_HEADINGS["assistant"] + "\n"


def _render(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    return render_chat(tokenizer, [{"role": "user", "content": instruction}])


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a whole chat ready for the answer, not shortened."""
    return _ids(tokenizer, render_chat(tokenizer, messages))


def chat_head(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids every one-turn chat starts with (the template's head and default system prompt), short of
    the last shared one, which could merge with another message's first characters."""
    first, second = _two_chats(tokenizer)
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return first[: max(shared - 1, 0)]


def chat_tail(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids every one-turn prompt ends with (the end of the user's turn and the assistant's turn
    marker), short of the first shared one, which could merge with the message's last characters."""
    first, second = _two_chats(tokenizer)
    shared = 0
    while shared < min(len(first), len(second)) and first[-1 - shared] == second[-1 - shared]:
        shared += 1
    return first[len(first) - max(shared - 1, 0) :]


def _two_chats(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    return (
        chat_ids(tokenizer, [{"role": "user", "content": "a"}]),
        chat_ids(tokenizer, [{"role": "user", "content": "Z 1"}]),
    )


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, instruction: str, budget: int) -> list[int]:
    """Token ids of the formatted prompt, at most ``budget`` long.

    A long instruction is cut in its middle (keeping its start and end, where the task is usually stated),
    so the template's turn markers always survive.
    """
    ids = _ids(tokenizer, _render(tokenizer, instruction))
    if len(ids) <= budget:
        return ids
    inner = _ids(tokenizer, instruction)
    overhead = len(ids) - len(inner)
    keep = max(budget - overhead - 1, 8)
    head = (keep * 3) // 4
    shortened = tokenizer.decode(inner[:head]) + " … " + tokenizer.decode(inner[len(inner) - (keep - head) :])
    return _ids(tokenizer, _render(tokenizer, shortened))[-budget:]


def training_ids(
    tokenizer: PreTrainedTokenizerBase, instruction: str, response: str, max_len: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one sample: the loss covers answer tokens (and the end token) only."""
    answer = [*_ids(tokenizer, response)[: max_len // 2], tokenizer.eos_token_id]
    prompt = prompt_ids(tokenizer, instruction, max_len - len(answer))
    return prompt + answer, [-100] * len(prompt) + answer


def embedding_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
    """Token ids of the raw input text (no template) for embedding, cut to ``max_len``."""
    return _ids(tokenizer, text)[:max_len] or [tokenizer.eos_token_id]
