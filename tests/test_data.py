import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from fedrouter.config import Config
from fedrouter.data import all_clients, load_source, synthetic
from fedrouter.data.formats import load_file
from fedrouter.data.partition import split_clients
from fedrouter.data.samples import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"id": "a", "task": "t", "instruction": "Say hi", "response": "hi"}


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, '{"instruction": "x", "response": '])
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        load_file(path)


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"id": "b", "instruction": "x"}, r" row 2: missing field 'response'"),
        ({"id": "b", "instruction": " ", "response": "y"}, r" row 2: field 'instruction' is empty"),
        ({"id": "b", "instruction": 3, "response": "y"}, r" row 2: field 'instruction' must be a string"),
        ({"id": "b", "instruction": "x", "response": "y", "task": "a b"}, r" row 2: field 'task' \(the task\) must be"),
        ({"id": "b", "instruction": "x", "response": "y", "references": [1]}, r" row 2: field 'references'"),
        ({"id": "b", "instruction": "x", "response": "y", "references": [" "]}, r" row 2: field 'references'"),
        (["not", "an", "object"], r":2: expected a JSON object"),
        ({"id": "a", "instruction": "x", "response": "y"}, r"duplicate id 'a'"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, row, pattern):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=pattern):
        load_file(path)


def test_empty_and_non_utf8_files(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="e.jsonl: no samples"):
        load_file(empty)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match="l.jsonl: not UTF-8"):
        load_file(latin)
    with pytest.raises(DataError, match="unsupported data file type"):
        load_file(tmp_path / "x.txt")


def test_csv_loading_and_errors(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text('id,task,instruction,response,references\n1,t,"Hello, there",hi,"[""hi"", ""hey""]"\n')
    (sample,) = load_file(good)
    assert sample.instruction == "Hello, there" and sample.golds == ("hi", "hey")
    bad = tmp_path / "b.csv"
    bad.write_text("instruction,response\nx,y\nonly-one-column\n")
    with pytest.raises(DataError, match=r"b.csv row 2: missing field 'response'"):
        load_file(bad)
    header = tmp_path / "h.csv"
    header.write_text("question,answer\nx,y\n")
    with pytest.raises(DataError, match=r"h.csv: format 'plain' needs a prompt column"):
        load_file(header)


def test_synthetic_is_deterministic_with_disjoint_splits():
    train, test = synthetic.generate(40, seed=0)
    again, _ = synthetic.generate(40, seed=0)
    assert [s.instruction for s in train] == [s.instruction for s in again]
    assert Counter(s.task for s in train) == dict.fromkeys(synthetic.TASKS, 40)
    assert not {s.instruction for s in train} & {s.instruction for s in test}
    assert {s.response for s in train if s.task == "sentiment"} == {"positive", "negative"}


@pytest.mark.parametrize(("scenario", "held"), [("single", 1), ("dual", 2), ("all", 4)])
def test_scenarios_are_balanced_and_never_share_training_samples(scenario, held):
    train, test = synthetic.generate(100, seed=0)
    clients = split_clients(
        train, test, num_clients=8, scenario=scenario, train_per_client=24, test_per_task=3,
        eval_sets=("personalized", "generalization"), seed=1,
    )  # fmt: skip
    ids = [s.id for c in clients for s in c.train]
    assert len(ids) == len(set(ids)) == 8 * 24
    for client in clients:
        counts = Counter(s.task for s in client.train)
        assert len(counts) == held and max(counts.values()) - min(counts.values()) <= 1
        assert {s.task for s in client.tests["personalized"]} == set(client.tasks)
        assert len(client.tests["generalization"]) == 4 * 3
    per_task = Counter(t for c in clients for t in c.tasks)
    assert max(per_task.values()) == min(per_task.values())  # clients spread evenly over tasks


def test_asking_for_more_samples_than_exist_is_an_error():
    train, test = synthetic.generate(10, seed=0)
    with pytest.raises(DataError, match="'data.train_per_client'"):
        split_clients(train, test, num_clients=8, scenario="single", train_per_client=8, test_per_task=1)


def test_folder_source_and_task_filter(tmp_path):
    rows = [
        {"id": f"{t}{i}", "task": t, "instruction": f"{t} q{i}", "response": "a"} for t in ("x", "y") for i in range(6)
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [dict(r, id="t" + r["id"]) for r in rows])
    cfg = Config({"data.source": str(tmp_path), "data.tasks": "x", "data.num_clients": 2, "data.train_per_client": 3})
    train, test = load_source(cfg)
    assert {s.task for s in train} == {"x"} and len(test) == 6
    with pytest.raises(DataError, match="'data.tasks'"):
        load_source(Config({"data.source": str(tmp_path), "data.tasks": "z"}))
    with pytest.raises(DataError, match="'data.source'"):
        load_source(Config({"data.source": str(tmp_path / "nowhere")}))


def test_unseen_tasks_leave_training_but_stay_in_the_generalization_test_set(tmp_path):
    rows = [
        {"id": f"{t}{i}", "task": t, "instruction": f"{t} q{i}", "response": "a"}
        for t in ("x", "y", "z")
        for i in range(12)
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [dict(r, id="t" + r["id"]) for r in rows])
    settings = {"data.source": str(tmp_path), "data.num_clients": 2, "data.train_per_client": 4,
                "data.test_per_task": 2, "eval.sets": "personalized,generalization"}  # fmt: skip
    clients = all_clients(Config(settings | {"data.unseen_tasks": "z"}))
    for client in clients:
        assert "z" not in {s.task for s in client.train} and "z" not in client.tasks
        assert "z" not in {s.task for s in client.tests["personalized"]}
        assert {s.task for s in client.tests["generalization"]} == {"x", "y", "z"}
    with pytest.raises(DataError, match="'data.unseen_tasks': no training samples of \\['w'\\]"):
        load_source(Config(settings | {"data.unseen_tasks": "w"}))
    with pytest.raises(DataError, match="every task out of training"):
        load_source(Config(settings | {"data.unseen_tasks": "x,y,z"}))


@pytest.mark.skipif(not (SHARED_DATA / "paper4").is_dir(), reason="needs ../shared/data")
def test_paper4_benchmark_split():
    cfg = Config(
        {
            "data.source": str(SHARED_DATA / "paper4"),
            "data.num_clients": 8,
            "data.scenario": "dual",
            "data.train_per_client": 96,
            "data.test_per_task": 16,
            "data.test_per_task_overrides": "qqp=64",
        }
    )
    clients = all_clients(cfg)
    assert [c.tasks for c in clients[:2]] == [["qqp", "webnlg"], ["webnlg", "samsum"]]
    assert all(len(c.train) == 96 for c in clients)
    assert Counter(s.task for s in clients[0].tests["personalized"]) == {"qqp": 64, "webnlg": 16}
