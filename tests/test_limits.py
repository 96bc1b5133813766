"""Bounded data and sane settings: a huge sample, file or row count is refused fast with a message naming where
(or cut, and counted, when asked), and every numeric setting refuses a value beyond sense with one line."""

import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from fedrouter.config import SECTIONS, SETTINGS, Config, ConfigError, load_config
from fedrouter.data import read_samples, source_samples
from fedrouter.data.formats import CUT_MARK, Reading, cut_text, load_file
from fedrouter.data.samples import DataError

HUGE = 50_000_000  # the probe's single-line sample: 50 MB of prompt


@pytest.fixture(scope="module")
def huge_file(tmp_path_factory) -> Path:
    """A JSON Lines file whose second row's prompt is 50 MB on one line (start 'BEGIN', end 'END?')."""
    path = tmp_path_factory.mktemp("huge") / "huge.jsonl"
    prompt = "BEGIN " + "x" * (HUGE - 10) + " END?"
    rows = [{"prompt": "short", "response": "fine"}, {"prompt": prompt, "response": "ok"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    handler = Collect()
    logger = logging.getLogger("fedrouter")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_a_50mb_sample_is_refused_fast_naming_file_row_and_field(huge_file: Path):
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_file(huge_file)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert str(huge_file) in message and "row 2" in message and "field 'prompt'" in message
    assert "data.max_sample_bytes = 1,048,576" in message and "data.on_too_long=truncate" in message
    assert "\n" not in message
    assert elapsed < 2.0, f"took {elapsed:.1f} s"


def test_truncate_cuts_the_sample_keeping_start_and_end_and_reports_the_count(huge_file: Path, log_lines):
    reading = Reading(on_too_long="truncate")
    samples = load_file(huge_file, reading)
    assert [s.response for s in samples] == ["fine", "ok"]
    cut = samples[1].instruction
    assert len(cut.encode()) <= reading.max_sample_bytes
    assert cut.startswith("BEGIN x") and cut.endswith("x END?") and CUT_MARK in cut
    assert f"data: {huge_file}: 1 samples cut to 1048576 bytes (data.max_sample_bytes)" in log_lines
    # run's data notes (the layout's description) say it as well
    ((_, layout),) = read_samples(str(huge_file), reading, 240, 0)["layouts"]
    assert "1 samples cut to 1048576 bytes (data.max_sample_bytes)" in layout.describe()


def test_answers_keep_their_start_and_chat_turns_are_named(tmp_path: Path):
    limit = Reading(max_sample_bytes=1024, on_too_long="truncate")
    path = tmp_path / "long.jsonl"
    answer = "é" * 2000  # 2 bytes a character: the cut must not split one
    path.write_text(json.dumps({"prompt": "q", "response": answer}) + "\n")
    (sample,) = load_file(path, limit)
    assert sample.response == "é" * 512
    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a" * 5000}]
    turns += [{"role": "user", "content": "b" * 5000}, {"role": "assistant", "content": "done"}]
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl row 1 \(line 1\), field 'messages' turn 2: 5,000 bytes of text"):
        load_file(chat, Reading(max_sample_bytes=1024))
    (sample,) = load_file(chat, limit)
    assert sample.context[-1] == ("assistant", "a" * 1024) and len(sample.instruction.encode()) <= 1024


def test_csv_texts_are_checked_after_reading(tmp_path: Path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["instruction", "output"], ["q", "a"], ["q2", "z" * 3000]])
    with pytest.raises(DataError, match=r"data.csv row 2, field 'output': 3,000 bytes of text, over data.max_sample"):
        load_file(path, Reading(max_sample_bytes=2048))


def test_an_id_is_never_cut(tmp_path: Path):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"id": "i" * 2000, "prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(DataError, match=r"row 1, field 'id': 2,000 bytes, .*a name is never cut"):
        load_file(path, Reading(max_sample_bytes=1024, on_too_long="truncate"))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_rows_over_the_limit_are_refused(tmp_path: Path, suffix: str):
    import datasets

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(11)]
    path = tmp_path / f"rows{suffix}"
    table = datasets.Dataset.from_list(rows)
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        getattr(table, {".jsonl": "to_json", ".csv": "to_csv", ".parquet": "to_parquet"}[suffix])(str(path))
    with pytest.raises(DataError, match=rf"rows{suffix}: 11 rows, over data.max_rows = 10: raise data.max_rows"):
        load_file(path, Reading(max_rows=10))
    assert len(load_file(path, Reading(max_rows=11))) == 11


def test_a_file_too_big_is_refused_before_it_is_read(tmp_path: Path):
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.truncate(2 * 1024**3)  # 2 GB, sparse: nothing is written
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"big.jsonl: 2,147,483,648 bytes \(2.0 GiB\), over data.max_file_bytes"):
        load_file(path)
    assert time.perf_counter() - start < 0.5


def test_the_limits_come_from_the_settings(tmp_path: Path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a", "task": "t"}) + "\n" for i in range(6)))
    cfg = Config({"data.source": str(path), "data.max_rows": 5})
    assert Reading.from_config(cfg).max_rows == 5
    with pytest.raises(DataError, match=r"6 rows, over data.max_rows = 5"):
        source_samples(cfg)
    train, test = source_samples(cfg.replace(data__max_rows=6))
    assert len(train) + len(test) == 6


def test_cut_text_fits_the_limit_in_bytes():
    for text in ("a" * 5000, "€" * 5000, "😀" * 5000, "ab" * 10):
        for ends in (True, False):
            cut = cut_text(text, 1024, ends=ends)
            assert len(cut.encode()) <= 1024 and cut.startswith(text[:10])
            assert cut == text or (CUT_MARK in cut) == ends
    assert "max_seq_len" in SETTINGS["data.max_sample_bytes"].help  # tokens are bounded at tokenization


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("train.batch_size", "1e20", r"'train.batch_size' expects int, got '1e20' \(a whole number is written in"),
        ("train.batch_size", 1e20, r"'train.batch_size' expects int, got float 1e\+20 \(a whole number"),
        ("train.batch_size", 10**20, r"'train.batch_size' must be at most 4096 \(.+\), got 100000000000000000000$"),
        ("train.batch_size", "8.0", r"'train.batch_size' expects int, got '8.0' \(a whole number"),
        ("train.local_steps", 10**9, r"'train.local_steps' must be at most 100000"),
        ("run.rounds", 10**6, r"'run.rounds' must be at most 10000"),
        ("data.num_clients", 10**6, r"'data.num_clients' must be at most 10000"),
        ("model.max_seq_len", 10**7, r"'model.max_seq_len' must be at most 131072"),
        ("eval.max_new_tokens", 10**6, r"'eval.max_new_tokens' must be at most 32768"),
        ("cluster.local_k_max", 10**4, r"'cluster.local_k_max' must be at most 256"),
        ("cluster.global_k", "99999", r"'cluster.global_k' must be 'auto' or a whole number of clusters from 1 to"),
        ("cluster.local_k", "9" * 5000, r"'cluster.local_k' must be 'auto' or .*\(5002 characters\)$"),
        ("data.synthetic_size", 10**8, r"'data.synthetic_size' must be at most 100000"),
        ("run.reply_timeout_s", 1e9, r"'run.reply_timeout_s' must be at most 604800"),
        ("run.seed", -1, r"'run.seed' must be at least 0"),
        ("run.client_gpus", "inf", r"'run.client_gpus' must be 'auto' or a number of GPUs from 0 to 64"),
        ("train.lr", 10**400, r"'train.lr' must be a finite number"),
        ("data.test_per_task_overrides", "qqp=10000000", r"expects 'task=number' items \(number from 1 to 100000\)"),
        ("data.max_sample_bytes", 10, r"'data.max_sample_bytes' must be at least 1024"),
        ("data.on_too_long", "skip", r"'data.on_too_long' must be one of 'refuse', 'truncate'"),
    ],
)
def test_values_beyond_sense_name_the_setting_in_one_line(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        Config({key: value})
    assert "\n" not in str(err.value)


def test_every_numeric_setting_has_an_upper_bound_and_a_valid_default():
    for key, setting in SETTINGS.items():
        if setting.type in (int, float) and key.split(".")[0] in SECTIONS:  # config.py's (not a method's)
            assert setting.check is not None, key
            assert setting.check(setting.default) is None, key
            assert setting.check(10**30) is not None, f"{key} accepts 1e30"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_still_loads(path: Path):
    load_config(path)


@pytest.mark.parametrize("value", ["1e20", "100000000000000000000"])
def test_the_cli_refuses_in_one_line(value: str):
    run = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "run", "--model", "tiny-random", f"train.batch_size={value}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "setting 'train.batch_size'" in lines[0]
