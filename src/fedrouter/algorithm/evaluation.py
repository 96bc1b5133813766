"""Evaluation figures: the keys clients send them under, and the server's summary of them (NumPy only).

A client sends sums and counts keyed ``<set>.<mode>.<task>.<metric>`` (``eval_key``), and how many samples of
each task went to each adapter as ``<set>.<mode>.<task>.route.<adapter>`` (``base``: the base model, where the
fallback sent it), and with ``routing.fallback`` on how many fell back as ``<set>.<mode>.<task>.fallback``;
``parse_eval_key`` reads them all.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np

from fedrouter.algorithm.metrics import NO_TASK, ROUGE_KEYS, routing_accuracy

SCORES = (*ROUGE_KEYS, "exact_match")


class EvalKey(NamedTuple):
    set_name: str
    mode: str
    task: str
    metric: str  # a score, "n", "fallback" or "route"
    adapter: int | str | None = None  # the global cluster of a "route" count, or "base"


def eval_key(set_name: str, mode: str, task: str, metric: str, adapter: str | None = None) -> str:
    return ".".join((set_name, mode, task, metric) + ((adapter,) if adapter is not None else ()))


def parse_eval_key(key: str) -> EvalKey | None:
    """The parts of an evaluation key; None for any other figure a client sends (timings, counts)."""
    parts = key.split(".")
    if len(parts) == 4:
        return EvalKey(*parts)
    if len(parts) == 5 and parts[3] == "route" and (parts[4].isdigit() or parts[4] == "base"):
        return EvalKey(*parts[:4], int(parts[4]) if parts[4].isdigit() else parts[4])
    return None


def summarize_evaluation(per_client: dict[int, dict[str, float]], train_table: np.ndarray, tasks: list[str]) -> dict:
    """Per (test set, routing mode): ROUGE and exact match per client and task, macro averages, routing accuracy.

    Macro averages weight every (client, task) pair equally. Routers also get ``routed``: test samples per true
    task and the adapter they were routed to, summed over clients (the label only counts where a sample went; it never picks the adapter).
    """
    table: dict[tuple[str, str], dict[int, dict[str, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    routed: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros_like(train_table))
    route_counts: dict[tuple[str, str], dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    for client, values in per_client.items():
        grouped: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
        for key, value in values.items():
            parsed = parse_eval_key(key)
            if parsed is None:
                continue
            if parsed.adapter is None:
                grouped[parsed[:3]][parsed.metric] = value
                continue
            by_adapter = route_counts[parsed[:2]][parsed.task]
            by_adapter[str(parsed.adapter)] = by_adapter.get(str(parsed.adapter), 0) + int(value)
            if parsed.task in tasks and isinstance(parsed.adapter, int) and 0 <= parsed.adapter < len(train_table):
                routed[parsed[:2]][parsed.adapter, tasks.index(parsed.task)] += int(value)
        for (set_name, mode, task), sums in grouped.items():
            n = sums.get("n", 0)
            if n > 0:
                table[(set_name, mode)][client][task] = {k: sums[k] / n for k in (*SCORES, "fallback") if k in sums} | {
                    "n": n
                }
    result: dict = {"by_set": {}, "overall": {}}
    for (set_name, mode), clients in sorted(table.items()):
        cells = [scores for by_task in clients.values() for scores in by_task.values()]
        per_task = defaultdict(list)
        for by_task in clients.values():
            for task, scores in by_task.items():
                per_task[task].append(scores)
        summary = {key: float(np.mean([c[key] for c in cells])) for key in SCORES}
        routing_acc = routing_accuracy(routed[(set_name, mode)], train_table)
        unlabelled = set(per_task) <= {NO_TASK}  # no task labels: no right adapter to count
        summary["routing_acc"] = None if np.isnan(routing_acc) or unlabelled else routing_acc
        summary["per_task"] = {
            task: {key: float(np.mean([c[key] for c in cs])) for key in SCORES} for task, cs in sorted(per_task.items())
        }
        summary["per_client"] = {
            client: {task: dict(scores) for task, scores in sorted(by_task.items())}
            for client, by_task in sorted(clients.items())
        }
        if (set_name, mode) in route_counts:
            summary["routed"] = {
                task: dict(sorted(counts.items(), key=lambda item: _adapter_order(item[0])))
                for task, counts in sorted(route_counts[(set_name, mode)].items())
            }
        if any("fallback" in c for c in cells):  # routing.fallback on: the share of answers it gave, per task
            weight = sum(c["n"] for c in cells)
            summary["fallback"] = {
                "share": sum(c.get("fallback", 0.0) * c["n"] for c in cells) / weight,
                "per_task": {
                    task: sum(c.get("fallback", 0.0) * c["n"] for c in cs) / sum(c["n"] for c in cs)
                    for task, cs in sorted(per_task.items())
                },
            }
        result["by_set"][f"{set_name}/{mode}"] = summary
        result["overall"][f"{set_name}/{mode}"] = {
            k: summary[k] for k in ("rouge1", "rouge2", "rougeL", "exact_match", "routing_acc")
        }
    return result


def _adapter_order(adapter: str) -> tuple[bool, int]:
    """Global clusters in number order, then "base"."""
    return (not adapter.isdigit(), int(adapter) if adapter.isdigit() else 0)
