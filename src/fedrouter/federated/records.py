"""What crosses the wire: NumPy arrays and plain configs, converted to Flower records and validated.

Nothing a peer sent is trusted: every array is checked for dtype, shape and finite values before use, and
configs are re-validated against the settings table. No pickle, no eval.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedrouter.algorithm.evaluation import SCORES, parse_eval_key
from fedrouter.arrays import Arrays
from fedrouter.config import Config, ConfigError
from fedrouter.errors import ReplyError

# Message types (Flower's "<category>.<action>").
CLUSTER = "query.cluster"
INITIAL = "query.initial"
REFINE = "query.refine"
TRAIN = "train"
EVALUATE = "evaluate"

MAX_ADAPTER_ELEMENTS = 200_000_000  # far above any LoRA adapter, far below a leaked embedding matrix x 10
MAX_METRIC = 1e15  # far above any count, time or loss; a million such values still sum to a finite float
# The metrics each reply carries besides its per-job (training) or per-test-set (evaluation) figures.
CLUSTER_METRICS = ("embed_s", "cluster_s", "num_samples", "model_loads")
TRAIN_METRICS = ("train_s", "model_loads")
EVALUATION_METRICS = ("answers_crc32", "eval_s", "model_loads", "generated_tokens")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def to_record(arrays: Mapping[str, np.ndarray], dtype: str | None = None) -> ArrayRecord:
    """NumPy arrays -> ArrayRecord (optionally cast, e.g. to float16 to halve the bytes)."""
    return ArrayRecord(
        {
            key: Array(np.ascontiguousarray(value if dtype is None else value.astype(dtype)))
            for key, value in arrays.items()
        }
    )


def from_record(record: ArrayRecord) -> Arrays:
    return {key: array.numpy() for key, array in record.items()}


def record_bytes(*records: ArrayRecord) -> int:
    return sum(len(array.data) for record in records for array in record.values())


def get_arrays(content, key: str, who: str) -> Arrays:
    if key not in content.array_records:
        raise ReplyError(f"{who}: missing array record '{key}'")
    try:
        return from_record(content.array_records[key])
    except (ValueError, TypeError) as err:
        raise ReplyError(f"{who}: array record '{key}' is not a NumPy array set: {err}") from None


def get_metrics(content, key: str, who: str) -> dict[str, float]:
    """A reply's metric record: numbers only, finite and below ``MAX_METRIC`` (sums of them stay finite)."""
    if key not in content.metric_records:
        raise ReplyError(f"{who}: missing metric record '{key}'")
    values: dict[str, float] = {}
    for name, value in content.metric_records[key].items():
        if isinstance(value, list) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ReplyError(f"{who}: metric '{name}' must be a finite number, got {value!r}")
        if abs(value) > MAX_METRIC:
            raise ReplyError(f"{who}: metric '{name}' = {value!r} is beyond {MAX_METRIC:g}")
        values[name] = float(value)
    return values


def check_metric_keys(values: Mapping[str, float], who: str, expected: Iterable[str]) -> None:
    """A reply's metrics must be exactly ``expected``: one missing, or one nobody asked for, rejects the reply."""
    expected = set(expected)
    missing, extra = sorted(expected - set(values)), sorted(set(values) - expected)
    if missing or extra:
        raise ReplyError(
            f"{who}: metrics differ from the expected ones (missing {missing[:3]}, unexpected {extra[:3]})"
        )


SCORE_MAX = 100.0  # ROUGE and exact match are percentages per sample (algorithm.metrics)


def check_evaluation(values: Mapping[str, float], who: str, sets: Iterable[str], modes: Iterable[str]) -> None:
    """An evaluation reply: ``EVALUATION_METRICS`` and, per (test set asked for, mode, task), a whole count
    ``n`` >= 1, every score's sum within [0, 100 n], and (routers) whole route and fallback counts of at most n."""
    sets, modes = set(sets), set(modes)
    groups: dict[tuple[str, str, str], dict[str, float]] = {}
    routes: dict[tuple[str, str, str], float] = {}
    fallbacks: dict[tuple[str, str, str], float] = {}
    for key, value in values.items():
        if key in EVALUATION_METRICS:
            continue
        parsed = parse_eval_key(key)
        if parsed is None or parsed.set_name not in sets or parsed.mode not in modes:
            raise ReplyError(f"{who}: unexpected metric '{key}'")
        check_name(parsed.task, f"{who} metric '{key}'")
        group = (parsed.set_name, parsed.mode, parsed.task)
        if parsed.adapter is not None:
            if value < 0 or value != int(value):
                raise ReplyError(f"{who}: metric '{key}' must be a whole count >= 0, got {value!r}")
            routes[group] = routes.get(group, 0.0) + value
        elif parsed.metric == "fallback":
            if value < 0 or value != int(value):
                raise ReplyError(f"{who}: metric '{key}' must be a whole count >= 0, got {value!r}")
            fallbacks[group] = value
        elif parsed.metric in (*SCORES, "n"):
            groups.setdefault(group, {})[parsed.metric] = value
        else:
            raise ReplyError(f"{who}: unexpected metric '{key}'")
    check_metric_keys({k: v for k, v in values.items() if k in EVALUATION_METRICS}, who, EVALUATION_METRICS)
    for group, sums in groups.items():
        n = sums.get("n", 0.0)
        where = f"{who}: test set {'/'.join(group)}"
        if n < 1 or n != int(n) or set(sums) != {*SCORES, "n"}:
            raise ReplyError(f"{where}: needs a whole count n >= 1 and every score ({', '.join(SCORES)})")
        if any(not 0 <= sums[score] <= SCORE_MAX * n for score in SCORES):
            raise ReplyError(f"{where}: a score sum is outside [0, {SCORE_MAX:g} x n = {SCORE_MAX * n:g}]")
        if routes.get(group, 0.0) > n:
            raise ReplyError(f"{where}: route counts add up to more than n = {n:g}")
        if fallbacks.get(group, 0.0) > n:
            raise ReplyError(f"{where}: more fallbacks than n = {n:g}")
    if (set(routes) | set(fallbacks)) - set(groups):
        raise ReplyError(f"{who}: route or fallback counts for a test set without scores")


def check_array(value: np.ndarray, what: str, *, shape: tuple[int | None, ...], kind: str = "f") -> np.ndarray:
    """Check dtype kind ('f' float, 'i' integer), rank/shape (None = any size) and finiteness."""
    if not isinstance(value, np.ndarray) or value.dtype.kind not in (kind, "u" if kind == "i" else kind):
        raise ReplyError(
            f"{what}: expected a {'float' if kind == 'f' else 'integer'} array, got {getattr(value, 'dtype', type(value))}"
        )
    if value.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape, strict=True)
    ):
        raise ReplyError(f"{what}: expected shape {tuple('*' if s is None else s for s in shape)}, got {value.shape}")
    if kind == "f" and not np.isfinite(value).all():
        raise ReplyError(f"{what}: contains NaN or infinite values")
    return value


def check_adapter(arrays: Arrays, reference: Mapping[str, tuple[int, ...]], what: str) -> Arrays:
    """An adapter must have exactly the reference keys and shapes, float values, all finite."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise ReplyError(f"{what}: adapter keys differ (missing {missing[:2]}, unexpected {extra[:2]})")
    checked: Arrays = {}
    for key, shape in reference.items():
        checked[key] = check_array(arrays[key], f"{what} '{key}'", shape=shape).astype(np.float32)
    return checked


def check_new_adapter(arrays: Arrays, what: str) -> Arrays:
    """The first adapter (from a client) sets the reference: LoRA matrices only, bounded size."""
    if not arrays:
        raise ReplyError(f"{what}: empty adapter")
    total = 0
    for key, value in arrays.items():
        if "lora_" not in key:
            raise ReplyError(f"{what}: '{key}' is not a LoRA weight (adapters carry LoRA weights only)")
        check_array(value, f"{what} '{key}'", shape=(None, None))
        total += value.size
    if total > MAX_ADAPTER_ELEMENTS:
        raise ReplyError(f"{what}: {total} values is far larger than a LoRA adapter")
    return {key: value.astype(np.float32) for key, value in arrays.items()}


def config_record(cfg: Config, **extra: int | float | str | bool | list) -> ConfigRecord:
    record = ConfigRecord({key: value for key, value in cfg.items()})
    for key, value in extra.items():
        record[key] = value
    return record


def read_config(record: ConfigRecord, extra_keys: tuple[str, ...] = ()) -> tuple[Config, dict]:
    """A received config, re-validated: (settings, the message's extra values)."""
    settings, extra = {}, {}
    for key, value in record.items():
        (extra if key in extra_keys else settings)[key] = value
    try:
        return Config(settings, where="received config"), extra
    except ConfigError as err:
        raise ReplyError(str(err)) from None


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.match(name):
        raise ReplyError(f"{what}: expected a task name of 1-64 letters, digits, '_' or '-', got {name!r}")
    return name
