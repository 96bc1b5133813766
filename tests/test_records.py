"""What crosses the wire is checked: dtypes, shapes, finite values, keys, configs."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from fedrouter.config import Config
from fedrouter.federated.records import (
    ReplyError,
    check_adapter,
    check_array,
    check_new_adapter,
    config_record,
    get_arrays,
    get_metrics,
    read_config,
    to_record,
)

REFERENCE = {"a.lora_A.weight": (2, 4), "a.lora_B.weight": (4, 2)}


def adapter(**changes):
    arrays = {k: np.ones(s, np.float32) for k, s in REFERENCE.items()}
    arrays.update(changes)
    return arrays


def test_round_trip_through_records_and_float16_halves_bytes():
    arrays = adapter()
    record = to_record(arrays)
    back = get_arrays(RecordDict({"x": record}), "x", "test")
    assert check_adapter(back, REFERENCE, "x")["a.lora_A.weight"].dtype == np.float32
    half = to_record(arrays, "float16")
    assert sum(len(a.data) for a in half.values()) < sum(len(a.data) for a in record.values())


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        (adapter(**{"a.lora_A.weight": np.ones((3, 4), np.float32)}), "expected shape"),
        (adapter(**{"a.lora_A.weight": np.full((2, 4), np.nan, np.float32)}), "NaN"),
        (adapter(**{"a.lora_B.weight": np.full((4, 2), np.inf, np.float32)}), "NaN or infinite"),
        (adapter(**{"a.lora_A.weight": np.ones((2, 4), np.int64)}), "expected a float array"),
        ({"a.lora_A.weight": np.ones((2, 4), np.float32)}, "missing"),
        (adapter(**{"extra.lora_A.weight": np.ones((1, 1), np.float32)}), "unexpected"),
    ],
)
def test_bad_adapters_are_rejected(arrays, pattern):
    with pytest.raises(ReplyError, match=pattern):
        check_adapter(arrays, REFERENCE, "client 1 adapter")


def test_first_adapter_must_be_lora_only_and_bounded():
    assert check_new_adapter(adapter(), "init")
    with pytest.raises(ReplyError, match="not a LoRA weight"):
        check_new_adapter({"model.embed_tokens.weight": np.ones((4, 4), np.float32)}, "init")
    with pytest.raises(ReplyError, match="empty adapter"):
        check_new_adapter({}, "init")


def test_missing_records_and_non_finite_metrics():
    with pytest.raises(ReplyError, match="missing array record 'clusters'"):
        get_arrays(RecordDict({}), "clusters", "node 7")
    from flwr.app import MetricRecord

    with pytest.raises(ReplyError, match="finite"):
        get_metrics(RecordDict({"m": MetricRecord({"loss": float("nan")})}), "m", "node 7")
    with pytest.raises(ReplyError, match="expected shape"):
        check_array(np.ones((3, 5), np.float32), "centroids", shape=(None, 4))


def test_received_config_is_revalidated():
    cfg, extra = read_config(config_record(Config(), round=2), ("round",))
    assert extra == {"round": 2} and cfg == Config()
    with pytest.raises(ReplyError, match="unknown setting 'evil'"):
        read_config(ConfigRecord({"evil": "x"}))
    with pytest.raises(ReplyError, match="'run.rounds' must be at least 0"):
        read_config(ConfigRecord({"run.rounds": -1}))
