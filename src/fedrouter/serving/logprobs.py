"""Token log-probabilities in the shapes of OpenAI's API: ``choices[].logprobs`` of chat completions (``content``:
one entry per token, with its ``bytes`` and ``top_logprobs``) and of legacy completions (``tokens``,
``token_logprobs``, ``top_logprobs``, ``text_offset``), whole or one stream chunk's worth at a time.

What the numbers are is ``decoding``'s: the log-softmax of a step's logits after the presence and frequency
penalties, before temperature and top-p, so a sampled token's log-probability is the model's, not the sampler's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from fedrouter.model.decoding import TokenLogprob


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenText:
    """Each token's text and UTF-8 bytes, from the tokenizer: a byte-level BPE token's own bytes (a character split
    across tokens has its bytes in each), else its decoded text's."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one per server, as long-lived as its tokenizer)
    def of(self, token: int) -> tuple[str, tuple[int, ...]]:
        text = self.tokenizer.decode([token])
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token)
            chars = _byte_of_char()
            if isinstance(piece, str) and piece and all(c in chars for c in piece):
                raw = bytes(chars[c] for c in piece)
                return raw.decode("utf-8", errors="replace"), tuple(raw)
        return text, tuple(text.encode("utf-8", errors="replace"))

    def chat(self, entries: Sequence[TokenLogprob]) -> dict:
        """``choices[].logprobs`` of a chat completion (or of one stream chunk)."""

        def item(token: int, logprob: float) -> dict:
            text, raw = self.of(token)
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
        return {"content": content, "refusal": None}

    def completion(self, entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
        """``choices[].logprobs`` of a legacy completion (or of one stream chunk whose first token starts at
        ``offset`` characters into the tokens' text): a token's ``text_offset`` counts its tokens' text before it."""
        tokens, offsets = [], []
        for entry in entries:
            offsets.append(offset)
            tokens.append(self.of(entry.token)[0])
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.of(t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
