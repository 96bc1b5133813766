"""How a client answers and scores its test samples, for every method (``Method.serve``, ``Method.activate``)."""

from __future__ import annotations

import zlib
from collections import defaultdict

from fedrouter.algorithm.evaluation import eval_key
from fedrouter.algorithm.metrics import exact_match, rouge
from fedrouter.data import Sample
from fedrouter.methods import Method, Serving
from fedrouter.model import compute

Answers = dict[tuple[str, str], list[tuple[tuple, str]]]  # (test set, mode) -> (adapter key, answer) per sample


def answer_tests(
    method: Method, serving: Serving, tests: dict[str, list[Sample]], modes: list[str]
) -> tuple[Answers, int]:
    """Answer every test sample under the method's serving rule: (test set, mode) -> [(adapter key, answer)].

    Every sample gets the same decoding (greedy, ``eval.max_new_tokens``, stop at end of sequence) and the same
    prompt; which adapter answers it follows the method's rule from its input alone (the oracle excepted). The
    sets overlap (a client's own tasks are in both): each sample is served once, and each (adapter, sample)
    answer generated once, however many sets and modes need it. Returns the answers and the generated tokens.
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
    max_new = cfg["eval.max_new_tokens"]
    generate_args = dict(
        max_new_tokens=max_new, batch_size=cfg["eval.batch_size"], max_len=cfg["model.max_seq_len"] + max_new
    )
    answers: dict[tuple[tuple, int], str] = {}
    generated_tokens = 0
    for key in sorted(wanted):
        group = sorted(wanted[key])
        with method.activate(serving, key):
            texts = compute.generate(base, [ordered[i].prompt for i in group], **generate_args)
        for i, text in zip(group, texts, strict=True):
            answers[(key, i)] = text
            generated_tokens += len(base.tokenizer(text, add_special_tokens=False)["input_ids"])
    out = {}
    for set_name, test in tests.items():
        for mode in modes:
            rows = [index_of[s.id] for s in test]
            out[(set_name, mode)] = [(chosen[mode][i], answers[(chosen[mode][i], i)]) for i in rows]
    return out, generated_tokens


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
