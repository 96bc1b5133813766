"""Property-based: malformed data lines and configs give a clean error (ours), never a library traceback, and
a loader either returns every sample or raises (no partial output)."""

import csv
import io
import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedrouter.config import SETTINGS, Config, load_config
from fedrouter.data.formats import load_file
from fedrouter.errors import ConfigError, DataError

FIELDS = ("id", "task", "instruction", "response", "references")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
records = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=6)
lines = st.one_of(
    records.map(json.dumps), st.text(max_size=60), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))
)
checks = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _non_blank(rows) -> int:
    return sum(1 for row in rows if row.strip())


@checks
@given(st.lists(lines, max_size=6))
def test_jsonl_lines_load_whole_or_fail_with_a_data_error(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(rows), encoding="utf-8")
    try:
        samples = load_file(path)
    except DataError as err:
        assert str(path) in str(err)
        return
    assert len(samples) == _non_blank("\n".join(rows).splitlines())


@checks
@given(st.binary(max_size=80))
def test_any_bytes_as_jsonl_or_csv_fail_cleanly(tmp_path, raw):
    for name, load in (("data.jsonl", load_file), ("data.csv", load_file)):
        path = tmp_path / name
        path.write_bytes(raw)
        try:
            load(path)
        except DataError as err:
            assert str(path) in str(err)


cells = st.text(max_size=15) | st.sampled_from(["", " ", '["a", "b"]', "[1]", "[", "qqp", "bad task!"])


@checks
@given(
    st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), min_size=1, max_size=6),
    st.lists(st.lists(cells, max_size=7), max_size=5),
)
def test_csv_rows_load_whole_or_fail_with_a_data_error(tmp_path, header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path = tmp_path / "data.csv"
    path.write_text(buffer.getvalue(), encoding="utf-8")
    try:
        samples = load_file(path)
    except DataError as err:
        assert str(path) in str(err)
        return
    assert len(samples) == sum(1 for row in rows if any(cell.strip() for cell in row))


config_values = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.lists(st.integers(), max_size=2)
)
config_keys = st.sampled_from(sorted(SETTINGS)) | st.text(max_size=20)


@checks
@given(st.dictionaries(config_keys, config_values, max_size=5))
@example({"run.reply_timeout_s": float("inf")})
@example({"train.lr": float("nan"), "run.rounds": "3"})
@example({"rounds": 2})
def test_any_settings_build_a_config_or_raise_a_config_error(values):
    try:
        cfg = Config(values)
    except ConfigError as err:
        assert "setting" in str(err) or "config" in str(err)
        return
    assert set(values) <= set(cfg)  # an accepted key is a real setting: nothing is silently dropped
    assert all(math.isfinite(v) for v in cfg.values() if isinstance(v, float))  # no NaN or infinite setting


@checks
@given(st.text(max_size=120))
def test_any_toml_text_loads_or_raises_a_config_error(tmp_path, text):
    path = tmp_path / "settings.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in str(err) or "setting" in str(err)
