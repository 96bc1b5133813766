"""Turning prompts (instructions or chats) into token ids: the chat template where the tokenizer has one, bounded in length."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedTokenizerBase

_FALLBACK_HEADINGS = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}
ROLES = tuple(_FALLBACK_HEADINGS)
Prompt = str | Sequence[Mapping[str, str]]  # an instruction (one user turn), or a chat ending with a user turn


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


def _messages(prompt: Prompt) -> list[Mapping[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _fit(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, budget: int) -> tuple[list[Mapping[str, str]], list[int]]:
    """The turns of a prompt that fit ``budget`` tokens, and their token ids.

    A chat loses its oldest turns first (never its system prompt, and always up to a user turn, so turns still
    alternate); a last user turn that alone is too long is cut in its middle (keeping its start and end, where
    the task is usually stated), so the template's turn markers always survive.
    """
    messages = _messages(prompt)
    ids = chat_ids(tokenizer, messages)
    system = 0
    while system < len(messages) - 1 and messages[system]["role"] == "system":
        system += 1
    while len(ids) > budget and len(messages) - system > 1:
        drop = system + 1
        while drop < len(messages) - 1 and messages[drop]["role"] != "user":
            drop += 1
        messages = messages[:system] + messages[drop:]
        ids = chat_ids(tokenizer, messages)
    if len(ids) <= budget:
        return messages, ids
    instruction = messages[-1]["content"]
    inner = _ids(tokenizer, instruction)
    keep = max(budget - (len(ids) - len(inner)) - 1, 8)
    while True:
        head = (keep * 3) // 4
        shortened = tokenizer.decode(inner[:head]) + " … " + tokenizer.decode(inner[len(inner) - (keep - head) :])
        cut = [*messages[:-1], {"role": "user", "content": shortened}]
        ids = chat_ids(tokenizer, cut)
        # The cut text can come out a token or two longer than counted (" … " and re-tokenized edges). A
        # single instruction is then cut from the left, as the v2 benchmark's prompts were (kept so its records
        # stay valid); a chat is shortened again instead, so its template's first marker survives.
        if len(ids) <= budget or isinstance(prompt, str) or keep <= 8:
            return cut, ids[-budget:]
        keep = max(keep - (len(ids) - budget), 8)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, budget: int) -> list[int]:
    """Token ids of the formatted prompt (an instruction, or a chat ending with a user turn), at most ``budget``
    long (see ``_fit`` for what gives way)."""
    return _fit(tokenizer, prompt, budget)[1]


def training_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: str, max_len: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one sample: the loss covers answer tokens (and the end token) only.

    In a chat, the earlier assistant turns that fit are answers too (``_chat_labels``).
    """
    answer = [*_ids(tokenizer, response)[: max_len // 2], tokenizer.eos_token_id]
    messages, prompt = _fit(tokenizer, prompt, max_len - len(answer))
    labels = [-100] * len(prompt)
    if any(m["role"] == "assistant" for m in messages):
        prompt, labels = _chat_labels(tokenizer, messages, prompt)
    return prompt + answer, labels + answer


def _chat_labels(
    tokenizer: PreTrainedTokenizerBase, messages: list[Mapping[str, str]], joint: list[int]
) -> tuple[list[int], list[int]]:
    """A chat's prompt ids with its earlier assistant turns (and the end token after each) as labels.

    The rendered chat is cut where each assistant turn's text starts and ends, and the pieces tokenized apart:
    the template's markers sit at the cuts, so the ids match the whole chat's (``joint``) for templates whose
    rendering of a chat's start is the rendering of the shorter chat (ChatML and the fallback headings). For a
    template that is not, or where the pieces come out longer, the earlier turns stay context only.
    """
    text = render_chat(tokenizer, messages)
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for a, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:a])
        if not text.startswith(before + message["content"]) or len(before) < cursor:
            return joint, [-100] * len(joint)
        _append(tokenizer, ids, labels, text[cursor : len(before)], train_end=cursor > 0)
        answer = _ids(tokenizer, message["content"])
        ids += answer
        labels += answer
        cursor = len(before) + len(message["content"])
    _append(tokenizer, ids, labels, text[cursor:], train_end=True)
    if len(ids) > len(joint):
        return joint, [-100] * len(joint)
    return ids, labels


def _append(tokenizer, ids: list[int], labels: list[int], piece: str, *, train_end: bool) -> None:
    """Add a piece of template text (context), the end token at its start trained when it closes an answer."""
    piece_ids = _ids(tokenizer, piece)
    ids += piece_ids
    labels += [-100] * len(piece_ids)
    if train_end and piece_ids and piece_ids[0] == tokenizer.eos_token_id:
        labels[len(labels) - len(piece_ids)] = piece_ids[0]


def embedding_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_len: int) -> list[int]:
    """Token ids of the raw input text (no template) for embedding, cut to ``max_len``."""
    return _ids(tokenizer, text)[:max_len] or [tokenizer.eos_token_id]
