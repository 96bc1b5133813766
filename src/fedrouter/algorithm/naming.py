"""Readable names for the global clusters: a description beside each adapter's id, never a replacement for it.

A global cluster's adapter keeps its id ``cluster_<g>`` everywhere (it is what an API caller sends as ``model``);
its *name* says what it serves. Where the clients reported task labels (``eval.report_labels``), the server
already holds each global cluster's training samples per task (``clustering.global_cluster_tasks`` in
metrics.json) and names the cluster after its majority task and that task's share of the cluster's samples:
``qqp (92%)``. Without labels a cluster is named ``cluster_<g>``. No new data leaves a client for this.

Names are free text a person may set (``fedrouter rename``), so every name is checked the same way: not empty, no
space at either end, at most ``MAX_NAME_LENGTH`` characters, no control character (no line break, tab or escape),
never another adapter's id, and unique among the clusters (ignoring case). Whoever shows a name in HTML escapes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fedrouter.algorithm.metrics import NO_TASK

MAX_NAME_LENGTH = 64
ADAPTER_ID = re.compile(r"cluster_\d+")


def adapter_id(g: int) -> str:
    """The stable id of global cluster ``g``'s adapter (its folder, its ``model`` in the API)."""
    return f"cluster_{g}"


def cluster_names(cluster_tasks: Mapping[int | str, Mapping[str, int]], num_global: int) -> list[str]:
    """A name per global cluster from its training samples per task: the majority task and its share (rounded
    down, so 100% means every sample), ``cluster_<g>`` where no sample has a task label.

    ``cluster_tasks``: global cluster (an int, or its decimal string as in metrics.json) -> task -> samples;
    samples without a label (task ``unknown``) count toward the share but never name a cluster. A majority tie
    goes to the task first in alphabetical order. Two clusters that would get the same name (ignoring case) both
    get their id appended, so every name is unique and each satisfies ``name_problem``.
    """
    counts = {int(g): tasks for g, tasks in cluster_tasks.items() if str(g).isdigit() and int(g) < num_global}
    labels: dict[int, tuple[str, int]] = {}
    for g, tasks in counts.items():
        labelled = {task: n for task, n in tasks.items() if task != NO_TASK and n > 0}
        total = sum(n for n in tasks.values() if n > 0)
        if not labelled:
            continue
        task, n = min(labelled.items(), key=lambda item: (-item[1], item[0]))
        labels[g] = (_printable(task), 100 * n // total)
    names = [_label(*labels[g]) if g in labels and labels[g][0] else adapter_id(g) for g in range(num_global)]
    seen: dict[str, int] = {}
    for name in names:
        seen[name.casefold()] = seen.get(name.casefold(), 0) + 1
    names = [
        _label(*labels[g], tag=f" [{adapter_id(g)}]") if seen[name.casefold()] > 1 else name
        for g, name in enumerate(names)
    ]
    return [name if not name_problem(name, g) else adapter_id(g) for g, name in enumerate(names)]


def _printable(text: str) -> str:
    """A task label as one line of printable text (labels come from the clients' data)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _label(task: str, share: int, tag: str = "") -> str:
    """``task (share%)`` plus ``tag``, the task cut short to keep the whole within MAX_NAME_LENGTH."""
    suffix = f" ({share}%){tag}"
    room = MAX_NAME_LENGTH - len(suffix)
    return (task if len(task) <= room else task[: room - 3].rstrip() + "...") + suffix


def name_problem(name: object, g: int) -> str | None:
    """What is wrong with ``name`` as global cluster ``g``'s name (None: nothing); one line, for a message."""
    if not isinstance(name, str):
        return f"not a string but {type(name).__name__}"
    if not name.strip():
        return "empty"
    if name != name.strip():
        return "space at its start or end"
    if len(name) > MAX_NAME_LENGTH:
        return f"{len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if not name.isprintable():
        return "holds a control character (a line break, tab or escape)"
    if ADAPTER_ID.fullmatch(name) and name != adapter_id(g):
        return f"another adapter's id (a name describes {adapter_id(g)}; ids never change)"
    return None


def check_names(names: Mapping[int, str]) -> None:
    """Every name valid for its cluster and no two alike (ignoring case); else ``ValueError`` of one line, naming
    the first cluster (in ``names``' order) whose name is bad or was taken by one before it."""
    first: dict[str, int] = {}
    for g, name in names.items():
        problem = name_problem(name, g)
        if problem:
            raise ValueError(f"{adapter_id(g)}: name {_shown(name)}: {problem}")
        other = first.setdefault(name.casefold(), g)
        if other != g:
            raise ValueError(
                f"{adapter_id(g)}: name {_shown(name)} is {adapter_id(other)}'s name too (names must be unique)"
            )


def _shown(name: object) -> str:
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."
