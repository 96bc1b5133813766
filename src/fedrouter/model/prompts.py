"""Turning instructions into token ids: the chat template where the tokenizer has one, bounded in length."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_FALLBACK = "### Instruction:\n{instruction}\n\n### Response:\n"


def _render(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return _FALLBACK.format(instruction=instruction)


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
