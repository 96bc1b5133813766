"""How a client answers and scores its test samples, for every method (``Method.serve``, ``Method.adapter``).

Test samples are answered by the loop that answers ``Router`` and ``fedrouter serve`` (``fedrouter.model.decoding``):
each adapter key's weights in a slot of their own, rows of any adapters decoded together, one end rule.
"""

from __future__ import annotations

import zlib
from collections import defaultdict

from fedrouter.algorithm.evaluation import eval_key
from fedrouter.algorithm.metrics import exact_match, rouge
from fedrouter.data import Sample
from fedrouter.methods import Method, Serving
from fedrouter.model import decoding, lora
from fedrouter.model.prompts import chat_head, prompt_ids

Answers = dict[tuple[str, str], list[tuple[tuple, str]]]  # (test set, mode) -> (adapter key, answer) per sample


def answer_tests(
    method: Method, serving: Serving, tests: dict[str, list[Sample]], modes: list[str]
) -> tuple[Answers, int]:
    """Answer every test sample under the method's serving rule: (test set, mode) -> [(adapter key, answer)].

    Every sample gets the same decoding (greedy, ``eval.max_new_tokens``, ``decoding``'s end rule) and the same
    prompt (cut to ``model.max_seq_len`` tokens); which adapter answers it follows the method's rule from its
    input alone (the oracle excepted). The sets overlap (a client's own tasks are in both): each sample is served
    once, and each (adapter, sample) answer decoded once, however many sets and modes need it, at most
    ``eval.batch_size`` rows at a time. Returns the answers and the generated tokens.
    """
    cfg, base = serving.cfg, serving.base
    samples = {s.id: s for test in tests.values() for s in test}
    index_of = {sample_id: i for i, sample_id in enumerate(samples)}
    ordered = list(samples.values())
    chosen = method.serve(serving, ordered, modes)
    wanted: dict[tuple, set[int]] = defaultdict(set)
    for keys in chosen.values():
        for row, key in enumerate(keys):
            wanted[key].add(row)
    adapters = {key: method.adapter(serving, key) for key in sorted(wanted)}
    slots = {
        key: decoding.BASE if arrays is None else f"answer_{n}" for n, (key, arrays) in enumerate(adapters.items())
    }
    ids = {
        i: prompt_ids(base.tokenizer, ordered[i].prompt, cfg["model.max_seq_len"])
        for i in set().union(*wanted.values())
    }
    pairs = [(key, i) for key in adapters for i in sorted(wanted[key])]
    sampling = decoding.Sampling(max_new_tokens=cfg["eval.max_new_tokens"])
    rows = [decoding.Row(ids[i], slots[key], sampling) for key, i in pairs]
    with lora.loaded(base, {slots[key]: arrays for key, arrays in adapters.items() if arrays is not None}):
        done = decoding.decode(base, rows, max_rows=cfg["eval.batch_size"], prefix=chat_head(base.tokenizer))
    answers = {pair: completion.text for pair, completion in zip(pairs, done, strict=True)}
    out = {}
    for set_name, test in tests.items():
        for mode in modes:
            rows_of = [index_of[s.id] for s in test]
            out[(set_name, mode)] = [(chosen[mode][i], answers[(chosen[mode][i], i)]) for i in rows_of]
    return out, sum(completion.completion_tokens for completion in done)


def score(
    tests: dict[str, list[Sample]], answered: Answers, count_routes: bool, count_fallbacks: bool = False
) -> dict[str, float]:
    """Sums and counts per ``<set>.<mode>.<task>.<metric>`` (labels score answers: only here); with
    ``count_routes``, how many samples of each task went to each shared adapter (routing accuracy) or to the base
    model, and with ``count_fallbacks`` how many of them the fallback answered (a key ending in "fallback")."""
    metrics: dict[str, float] = defaultdict(float)
    for (set_name, mode), rows in answered.items():
        for sample, (key, prediction) in zip(tests[set_name], rows, strict=True):
            for name, value in rouge(prediction, sample.golds).items():
                metrics[eval_key(set_name, mode, sample.task, name)] += value
            metrics[eval_key(set_name, mode, sample.task, "exact_match")] += exact_match(prediction, sample.golds)
            metrics[eval_key(set_name, mode, sample.task, "n")] += 1
            if count_routes:  # a router's keys are ("shared", global cluster) or ("base", "base"), "fallback" added
                metrics[eval_key(set_name, mode, sample.task, "route", key[1])] += 1
            if count_fallbacks:
                metrics[eval_key(set_name, mode, sample.task, "fallback")] += key[-1] == "fallback"
    return dict(metrics)


def answers_digest(tests: dict[str, list[Sample]], answered: Answers) -> int:
    """A CRC-32 of every (test set, mode, sample, adapter, answer): two runs answered alike exactly when their
    digests match, and no text leaves the client."""
    digest = 0
    for (set_name, mode), rows in sorted(answered.items()):
        for sample, (key, prediction) in zip(tests[set_name], rows, strict=True):
            digest = zlib.crc32(f"{set_name}\t{mode}\t{sample.id}\t{key}\t{prediction}\n".encode(), digest)
    return digest
