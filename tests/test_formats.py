"""Users' data as they hold it: files written by `datasets` itself in every shape, read back field for field;
no field dropped without being told; a column map; chats; clients from the data."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
from conftest import SHARED_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrouter.config import Config
from fedrouter.data import all_clients, load_source, read_samples, synthetic
from fedrouter.data.formats import INPUT_JOIN, KNOWN_NAMES, Reading, load_file
from fedrouter.data.samples import DataError

datasets.disable_progress_bars()
TASKS = ("sentiment", "extraction", "sorting", "data2text")


def _pairs(per_task: int = 6):
    """(task, instruction, its input, response) from the synthetic tasks: the instruction cut at its ': '."""
    train, _ = synthetic.generate(per_task, seed=0)
    for s in train:
        head, _, tail = s.instruction.partition(": ")
        yield s.task, head, tail, s.response


def plain_rows():
    return [
        {"id": f"p{i}", "instruction": f"{h}: {x}", "response": r, "task": t} for i, (t, h, x, r) in enumerate(_pairs())
    ]


def alpaca_rows():
    return [{"instruction": h, "input": x, "output": r, "task": t} for t, h, x, r in _pairs()]


def dolly_rows():
    return [{"instruction": h, "context": x, "response": r, "category": t} for t, h, x, r in _pairs()]


def messages_rows():
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Ready?"},
                {"role": "assistant", "content": f"Ready for {t}."},
                {"role": "user", "content": f"{h}: {x}"},
                {"role": "assistant", "content": r},
            ],
            "task": t,
        }
        for t, h, x, r in _pairs()
    ]


def sharegpt_rows():
    return [
        {
            "conversations": [{"from": "human", "value": f"{h}: {x}"}, {"from": "gpt", "value": r}],
            "system": "You are careful.",
            "task": t,
        }
        for t, h, x, r in _pairs()
    ]


SHAPES = {
    "plain": plain_rows,
    "alpaca": alpaca_rows,
    "dolly": dolly_rows,
    "messages": messages_rows,
    "sharegpt": sharegpt_rows,
}
WRITERS = {
    "jsonl": lambda ds, path: ds.to_json(path / "d.jsonl"),
    "json": lambda ds, path: ds.to_json(path / "d.json", lines=False),
    "csv": lambda ds, path: ds.to_csv(path / "d.csv", index=False),
    "parquet": lambda ds, path: ds.to_parquet(path / "d.parquet"),
    "saved": lambda ds, path: ds.save_to_disk(path / "saved"),
}
FILES = {"jsonl": "d.jsonl", "json": "d.json", "csv": "d.csv", "parquet": "d.parquet", "saved": "saved"}


def write(rows: list[dict], folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    WRITERS[kind](datasets.Dataset.from_list(rows), folder)
    return folder / FILES[kind]


def expected(shape: str, row: dict) -> tuple:
    """(context, instruction, response, task) that a row of each shape must give."""
    if shape == "plain":
        return (), row["instruction"], row["response"], row["task"]
    if shape in ("alpaca", "dolly"):
        given_input = row.get("input", row.get("context"))
        return (
            (),
            row["instruction"] + INPUT_JOIN + given_input,
            row.get("output", row.get("response")),
            row.get("task", row.get("category")),
        )
    if shape == "messages":
        turns = [(m["role"], m["content"]) for m in row["messages"]]
        return tuple(turns[:-2]), turns[-2][1], turns[-1][1], row["task"]
    return (("system", row["system"]),), row["conversations"][0]["value"], row["conversations"][1]["value"], row["task"]


def read_back(path: Path) -> list:
    return list(read_samples(str(path), Reading(), 240, 0)["all"])


@pytest.mark.parametrize("kind", list(WRITERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_in_every_file_type_reads_back_field_for_field(tmp_path, shape, kind):
    if kind == "csv" and shape in ("messages", "sharegpt"):
        pytest.skip("a CSV cell holds text, not a list of turns")
    rows = SHAPES[shape]()
    samples = read_back(write(rows, tmp_path, kind))
    assert len(samples) == len(rows)
    for row, sample in zip(rows, samples, strict=True):
        assert (sample.context, sample.instruction, sample.response, sample.task) == expected(shape, row)


def test_auto_detection_names_the_format(tmp_path):
    detected = {}
    for shape in SHAPES:
        path = write(SHAPES[shape](), tmp_path / shape, "jsonl")
        ((_, layout),) = read_samples(str(path), Reading(), 240, 0)["layouts"]
        detected[shape] = (layout.format, layout.detected)
    assert detected == {
        "plain": ("plain", True),
        "alpaca": ("alpaca", True),
        "dolly": ("alpaca", True),
        "messages": ("messages", True),
        "sharegpt": ("messages", True),
    }


# --- nothing dropped silently -------------------------------------------------------------------------------

column_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(list(SHAPES)), extra=column_names, ignore=st.booleans())
def test_every_field_reaches_the_sample_or_is_refused_or_ignored(tmp_path_factory, shape, extra, ignore):
    rows = SHAPES[shape]()[:4]
    if extra in rows[0]:
        return
    rows = [dict(row, **{extra: f"value-{i}-of-{extra}"}) for i, row in enumerate(rows)]
    path = write(rows, tmp_path_factory.mktemp("d"), "jsonl")
    reading = Reading(ignore=(extra,)) if ignore else Reading()
    try:
        samples = load_file(path, reading)
    except DataError as err:
        assert not ignore and repr(extra) in str(err) and "data.ignore_columns" in str(err), err
        return
    for row, sample in zip(rows, samples, strict=True):
        seen = [sample.id, sample.instruction, sample.response, sample.task, sample.client or "", *sample.references]
        seen += [content for _, content in sample.context]
        for column, value in row.items():
            if column == extra and ignore:
                continue
            if isinstance(value, list):  # a chat: every turn's text is somewhere
                for turn in value:
                    text = turn.get("content", turn.get("value"))
                    assert any(text in part for part in seen), (column, text)
            else:
                assert any(value in part for part in seen), (column, value)
    # A known role name is read, never dropped: only names no role knows could be ignored or refused.
    assert ignore or any(extra in names for names in KNOWN_NAMES.values())


def test_unknown_column_error_names_it_and_both_settings(tmp_path):
    rows = [dict(row, notes="keep me") for row in plain_rows()]
    path = write(rows, tmp_path, "jsonl")
    with pytest.raises(DataError) as err:
        load_file(path)
    message = str(err.value)
    assert "'notes'" in message and "data.columns.ROLE=COLUMN" in message and "data.ignore_columns=notes" in message


def test_ambiguous_and_missing_columns_are_errors(tmp_path):
    both = write([{"instruction": "a", "prompt": "b", "response": "c"}], tmp_path / "both", "jsonl")
    with pytest.raises(DataError, match=r"could each be the prompt: choose one with data.columns.prompt"):
        load_file(both)
    chat = write(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "x"}]}],
        tmp_path / "chat",
        "jsonl",
    )
    with pytest.raises(DataError, match=r"row 1, field 'messages' turn 2: key\(s\) \['name'\] are not read"):
        load_file(chat)
    unanswered = write([{"messages": [{"role": "user", "content": "hi"}]}], tmp_path / "open", "jsonl")
    with pytest.raises(DataError, match="must end with a user turn and the assistant's answer"):
        load_file(unanswered)
    tool = write([{"conversations": [{"from": "observation", "value": "x"}]}], tmp_path / "tool", "jsonl")
    with pytest.raises(DataError, match="role 'observation' is not one of"):
        load_file(tool)


def test_a_users_column_map(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"A{i}", "label": t, "source": "web"} for i, t in enumerate(TASKS * 3)]
    path = write(rows, tmp_path, "jsonl")
    with pytest.raises(DataError, match="format 'plain' needs a prompt column"):
        load_file(path)
    cfg = Config(
        {
            "data.source": str(path),
            "data.columns.prompt": "question",
            "data.columns.response": "answer",
            "data.columns.task": "label",
            "data.ignore_columns": "source",
        }
    )
    train, test = load_source(cfg)
    samples = sorted(train + test, key=lambda s: int(s.instruction[1:-1]))
    assert [(s.instruction, s.response, s.task) for s in samples] == [
        (r["question"], r["answer"], r["label"]) for r in rows
    ]
    with pytest.raises(DataError, match="setting 'data.columns.prompt': no column 'query'"):
        load_source(cfg.replace(**{"data.columns.prompt": "query"}))


# --- clients from the data ----------------------------------------------------------------------------------


def _client_rows(clients: int, per_client: int) -> list[dict]:
    rows = []
    for c in range(clients):
        for i, (t, h, x, r) in enumerate(list(_pairs(per_client))[c::clients][:per_client]):
            rows.append({"id": f"c{c}-{i}", "instruction": f"{h}: {x}", "response": r, "task": t, "client": f"site{c}"})
    return rows


def test_column_partition_gives_each_value_its_own_client(tmp_path):
    rows = _client_rows(3, 15)
    path = write(rows, tmp_path, "jsonl")
    cfg = Config({"data.source": str(path), "data.partition": "column", "data.num_clients": 3, "data.test_per_task": 1})
    clients = all_clients(cfg)
    assert len(clients) == 3
    for c, client in enumerate(clients):
        assert {s.client for s in client.train} == {f"site{c}"}
        assert {s.client for s in client.tests["personalized"]} == {f"site{c}"}
    every = [s.id for c in clients for s in c.train] + [s.id for c in clients for s in c.tests["personalized"]]
    assert sorted(every) == sorted(r["id"] for r in rows)  # held out per client, none lost, none shared
    with pytest.raises(DataError, match=r"names 3 clients \(site0, site1, site2\): set data.num_clients=3"):
        all_clients(cfg.replace(**{"data.num_clients": 2}))


def test_dirichlet_partition_uses_flower_datasets_and_is_seeded(tmp_path):
    cfg = Config(
        {"data.partition": "dirichlet", "data.num_clients": 4, "data.dirichlet_alpha": 0.3, "data.synthetic_size": 40}
    )
    first = all_clients(cfg)
    assert [[s.id for s in c.train] for c in first] == [[s.id for s in c.train] for c in all_clients(cfg)]
    ids = [s.id for c in first for s in c.train]
    assert len(ids) == len(set(ids)) == 4 * 40  # every training sample dealt once
    mixes = [Counter(s.task for s in c.train) for c in first]
    assert any(len(mix) < 4 or max(mix.values()) > 2 * min(mix.values()) for mix in mixes)  # skewed, not iid
    for client, mix in zip(first, mixes, strict=True):
        assert client.tasks == list(mix) and {s.task for s in client.tests["personalized"]} == set(mix)


def test_files_partition_reads_one_file_or_folder_per_client(tmp_path):
    write(plain_rows(), tmp_path / "clients", "parquet").rename(tmp_path / "clients" / "client0.parquet")
    write(dolly_rows(), tmp_path / "tmp1", "csv").rename(tmp_path / "clients" / "client1.csv")
    write(messages_rows(), tmp_path / "clients" / "client2", "jsonl").rename(
        tmp_path / "clients" / "client2" / "all.jsonl"
    )
    cfg = Config({"data.source": str(tmp_path / "clients"), "data.partition": "files", "data.num_clients": 3})
    clients = all_clients(cfg)
    assert clients[2].train[0].context[0] == ("system", "Answer briefly.")
    assert all(len(c.train) + len({s.id for s in c.tests["personalized"]}) >= 24 for c in clients)
    with pytest.raises(DataError, match="holds 3 client files or folders .*: set data.num_clients=3"):
        all_clients(cfg.replace(**{"data.num_clients": 4}))


def test_unlabelled_data_works_with_the_default_scenario(tmp_path):
    rows = [{"instruction": f"{h}: {x}", "response": r} for _, h, x, r in _pairs(10)]
    path = write(rows, tmp_path, "jsonl")
    clients = all_clients(Config({"data.source": str(path), "data.num_clients": 2, "data.train_per_client": 10}))
    assert [len(c.train) for c in clients] == [10, 10] and clients[0].tasks == ["unknown"]
    with pytest.raises(DataError, match="'dirichlet' deals samples by task: the data has no task labels"):
        all_clients(Config({"data.source": str(path), "data.partition": "dirichlet", "data.num_clients": 2}))


# --- single-turn data keeps the prompts and answers the committed benchmark scored --------------------------


@pytest.mark.skipif(not (SHARED_DATA / "paper4-raw").is_dir(), reason="needs ../shared/data")
@pytest.mark.parametrize("source", ["paper4-raw", "flan16"])
def test_benchmark_data_reads_as_the_v2_records_read_it(source):
    """The v2 records were made by the hand-written JSONL reader, which took each line's fields as they are."""
    for split in ("train", "test"):
        path = SHARED_DATA / source / f"{split}.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        samples = load_file(path)
        assert [(s.id, s.instruction, s.response, s.task, s.references, s.context) for s in samples] == [
            (r["id"], r["instruction"], r["response"], r["task"], tuple(r.get("references", ())), ()) for r in lines
        ]


# --- through the real CLI ---------------------------------------------------------------------------------------


def _cli(*args):
    env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    return subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", *args], capture_output=True, text=True, timeout=900, env=env
    )


@pytest.mark.slow
def test_every_format_trains_through_fedrouter_run_one_client_each(tmp_path):
    """Five clients, each holding its own file in another shape and file type (data.partition = 'files'):
    written by `datasets`, read, clustered, trained and evaluated by `fedrouter run` on the tiny model."""
    clients = tmp_path / "clients"
    placed = [
        ("plain", "parquet", "c0.parquet"),
        ("alpaca", "json", "c1.json"),
        ("dolly", "csv", "c2.csv"),
        ("messages", "saved", "c3"),
        ("sharegpt", "jsonl", "c4.jsonl"),
    ]
    clients.mkdir()
    for shape, kind, name in placed:
        write(SHAPES[shape](), tmp_path / f"w-{name}", kind).rename(clients / name)
    done = _cli(
        "run", "--quiet", "--model", "tiny-random", "--clients", "5", "--rounds", "1", "--data", str(clients),
        "--output", str(tmp_path / "runs"), "--name", "formats", "data.partition=files", "data.test_per_task=1",
        "train.local_steps=1", "eval.max_new_tokens=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = re.sub(r"\s+", "", done.stderr)
    for (_, _, name), detected in zip(placed, ("plain", "alpaca", "alpaca", "messages", "messages"), strict=True):
        assert f"{name}:format'{detected}'(detected)" in said, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "formats" / "metrics.json").read_text())
    assert sorted(metrics["clustering"]["local_k"]) == ["0", "1", "2", "3", "4"]
    assert metrics["rounds"][0]["accepted"] >= 5
    per_client = metrics["evaluation"]["by_set"]["personalized/global"]["per_client"]
    assert sorted(per_client) == ["0", "1", "2", "3", "4"]
    assert all(set(by_task) == set(TASKS) for by_task in per_client.values())


@pytest.mark.slow
def test_dolly_context_reaches_the_prompt_and_an_unknown_field_stops_the_run_before_it_starts(tmp_path):
    rows = dolly_rows()
    path = write(rows, tmp_path, "jsonl")
    from fedrouter.data.inspect import inspect_report

    report = inspect_report(
        Config(
            {"data.source": str(path), "model.name": "tiny-random", "data.num_clients": 2, "data.train_per_client": 4}
        )
    )
    joined = {r["instruction"] + INPUT_JOIN + r["context"] for r in rows}
    asked = report["example"]["eval_prompt"]
    assert any(text in asked for text in joined) and any(text in report["example"]["training_text"] for text in joined)
    bad = write([dict(r, source="web") for r in rows], tmp_path / "bad", "jsonl")
    done = _cli("run", "--quiet", "--model", "tiny-random", "--data", str(bad), "--output", str(tmp_path / "runs"))
    assert done.returncode == 2 and "column(s) ['source'] are read by nothing" in done.stderr
    assert "data.ignore_columns=source" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # refused before a run folder, Ray or any model (no timing: CI is shared)


@pytest.mark.slow
def test_unlabelled_data_runs_and_says_no_task_labels_instead_of_a_number(tmp_path):
    rows = [{"prompt": f"{h}: {x}", "completion": r} for _, h, x, r in _pairs(8)]
    path = write(rows, tmp_path, "parquet")
    done = _cli(
        "run", "--quiet", "--model", "tiny-random", "--clients", "2", "--rounds", "1", "--data", str(path),
        "--output", str(tmp_path / "runs"), "--name", "plain", "data.train_per_client=8", "train.local_steps=1",
        "eval.max_new_tokens=2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no task labels" in done.stdout and "data.scenario 'dual' deals samples at random" in done.stderr
    metrics = json.loads((tmp_path / "runs" / "plain" / "metrics.json").read_text())
    clustering = metrics["clustering"]
    assert clustering["task_labels"] is False and clustering["cluster_acc_global"] is None
    assert all(result["routing_acc"] is None for result in metrics["evaluation"]["overall"].values())
