"""The schema of a run's ``metrics.json``: what the server writes, and the benchmark and the reports read.

The server builds these dictionaries (``federated.server``, ``federated.membership``,
``algorithm.evaluation``); ``finished`` checks a finished run's file against them before anything reads it, so a
missing figure is a clear error naming the file and the key, not a ``KeyError`` deep in a table.
"""

from pathlib import Path
from typing import Any, NotRequired, TypedDict, get_type_hints, is_typeddict

from fedrouter.errors import ArtifactError


class RoundRecord(TypedDict):
    """One training round, as the server saw it."""

    round: int
    lr: float
    seconds: float
    counted: bool  # enough valid replies ('run.min_replies') for the averages to count
    accepted: int
    rejected: dict[str, str]  # client -> why
    train_loss: dict[str, float]  # shared adapter (or 'personal:<job>') -> mean loss over clients
    client_loss: NotRequired[dict[str, dict[str, float]]]  # client -> adapter -> its loss (accepted replies)
    updated_adapters: list[str]
    adapter_norms: dict[str, float]
    bytes_up: int
    bytes_down: int
    eval: NotRequired[dict[str, dict[str, Any]]]  # a round check ('eval.round_samples'): overall scores


class Clustering(TypedDict):
    local_k: dict[str, int]  # client -> local clusters
    global_k: int
    task_labels: NotRequired[bool]  # False: the data names no tasks, so nothing is scored against them
    cluster_acc_local: float | None  # None: the method does not cluster, or no labels were reported
    cluster_acc_global: float | None
    global_cluster_tasks: dict[str, dict[str, int]]  # global cluster -> task -> training samples
    silhouette_local: dict[str, dict[str, float]]
    silhouette_global: dict[str, float]
    cluster_map: dict[str, list[int]]  # client -> global cluster of each local cluster
    local_k_before_refinement: NotRequired[dict[str, int]]


class Phases(TypedDict):
    embed_s: float
    local_cluster_s: float
    clustering_s: float
    training_s: NotRequired[float]


class SetSummary(TypedDict):
    """One ``<set>/<mode>`` of the evaluation: macro averages, routing accuracy, per task and per client."""

    rouge1: float
    rouge2: float
    rougeL: float
    exact_match: float
    routing_acc: float | None
    per_task: dict[str, dict[str, float]]
    per_client: dict[str, dict[str, dict[str, float]]]
    routed: NotRequired[dict[str, dict[str, int]]]  # routers: true task -> adapter -> test samples routed to it


class Evaluation(TypedDict):
    by_set: dict[str, SetSummary]
    overall: dict[str, dict[str, float | None]]
    missing_clients: dict[str, str]


class Sent(TypedDict):
    up_total: int
    down_total: int
    adapter_bytes: int


class RunMetrics(TypedDict):
    """A finished run (the file also holds these keys, as far as reached, while the run goes on)."""

    config: dict[str, Any]
    method: str
    rounds: list[RoundRecord]
    phases: Phases
    clustering: Clustering
    clustering_rejected: dict[str, str]
    clustering_bytes_up: int
    clustering_bytes_down: int
    model_loads_per_process: int
    bytes: Sent
    elapsed_s: float
    wall_s: float
    resumed: NotRequired[list[dict[str, int]]]
    # With evaluation ('eval.sets' not 'none'):
    evaluation: NotRequired[Evaluation]
    evaluation_s: NotRequired[float]
    eval_bytes_down: NotRequired[int]
    eval_tokens: NotRequired[int]
    answers_crc32: NotRequired[dict[str, int]]  # client -> checksum of its answers
    eval_model_loads_per_process: NotRequired[int]


def missing_keys(value: Any, schema: type, where: str = "") -> list[str]:
    """The required keys of ``schema`` (and of the typed dictionaries inside it) that ``value`` lacks."""
    if not isinstance(value, dict):
        return [where or "(top)"]
    hints = get_type_hints(schema, include_extras=True)
    missing = []
    for key, hint in hints.items():
        path = f"{where}.{key}" if where else key
        if key not in value:
            if key in schema.__required_keys__:
                missing.append(path)
            continue
        inner = getattr(hint, "__args__", (hint,))[0] if _not_required(hint) else hint
        if is_typeddict(inner):
            missing += missing_keys(value[key], inner, path)
        elif getattr(inner, "__origin__", None) is list and is_typeddict(inner.__args__[0]):
            for i, item in enumerate(value[key]):
                missing += missing_keys(item, inner.__args__[0], f"{path}[{i}]")
        elif getattr(inner, "__origin__", None) is dict and is_typeddict(inner.__args__[1]):
            for name, item in value[key].items():
                missing += missing_keys(item, inner.__args__[1], f"{path}.{name}")
    return missing


def _not_required(hint: Any) -> bool:
    return getattr(hint, "__origin__", None) is NotRequired


def checked(metrics: dict, path: Path | str) -> RunMetrics:
    """``metrics`` (read from ``path``) as a finished run's, or an error naming what is missing."""
    missing = missing_keys(metrics, RunMetrics)
    if missing:
        raise ArtifactError(f"{path}: not a finished FedRouter run's metrics (missing {', '.join(missing[:5])})")
    return metrics  # type: ignore[return-value]
