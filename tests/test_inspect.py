"""``fedrouter data inspect``: what a user sees of their data before training."""

from __future__ import annotations

import datasets
import pytest

from fedrouter.cli import main
from fedrouter.config import load_config
from fedrouter.data.formats import INPUT_JOIN
from fedrouter.data.inspect import TRAINED_CLOSE, TRAINED_OPEN, inspect_report, load_tokenizer

TASKS = ("summarize", "translate", "classify")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-random")


def alpaca_rows(n: int = 30) -> list[dict]:
    rows = []
    for i in range(n):
        task = TASKS[i % 3]
        rows.append(
            {
                "instruction": f"Do the {task} task, case {i}.",
                "input": f"input text {i}" if task != "classify" else "",
                "output": f"answer {i}",
                "category": task,
            }
        )
    return rows


def chat_rows(n: int = 10) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Hi {i}"},
                {"role": "assistant", "content": "Hello there!"},
                {"role": "user", "content": f"What is {i} plus 1?"},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(n)
    ]


def write(path, rows) -> str:
    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).to_json(str(path))
    return str(path)


def settings(source: str, **extra) -> dict:
    return {"data.source": source, "model.name": "tiny-random", "data.num_clients": 3, **extra}


def test_report_of_alpaca_file(tmp_path, tokenizer):
    source = write(tmp_path / "train.jsonl", alpaca_rows())
    cfg = load_config(None, settings(source, **{"data.train_per_client": 4, "data.test_per_task": 1}))
    report = inspect_report(cfg, tokenizer)

    (table,) = report["sources"][0]["tables"]
    assert (table["format"], table["detected"]) == ("alpaca", True)
    assert table["columns"] == {"prompt": "instruction", "input": "input", "response": "output", "task": "category"}
    assert report["sources"][0]["rows"] == {"all": 30}
    assert "held out" in report["sources"][0]["split"]
    assert (report["train"], report["test"]) == (24, 6)  # a fifth of each task held out
    assert report["tasks"] == {task: {"train": 8, "test": 2} for task in TASKS}
    # dual scenario: each client holds two neighbouring tasks, 2 samples of each
    assert [c["tasks"] for c in report["clients"]] == [
        {"summarize": 2, "translate": 2},
        {"translate": 2, "classify": 2},
        {"classify": 2, "summarize": 2},
    ]
    assert all(c["train"] == 4 and c["tests"]["personalized"] == 2 for c in report["clients"])

    tokens = report["tokens"]
    assert tokens["train_samples"] == 24 and tokens["shortened"] == 0
    assert 0 < tokens["answer"]["min"] <= tokens["answer"]["median"] <= tokens["answer"]["max"]

    example = report["example"]
    assert example["turns"] is None
    trained = "".join(s["text"] for s in example["segments"] if s["trained"])
    assert trained.startswith(example["response"])
    context = "".join(s["text"] for s in example["segments"] if not s["trained"])
    assert example["eval_prompt"].strip() in context.strip()
    if example["task"] != "classify":  # the input is joined to the instruction in both texts
        number = example["id"].split("-")[-1]
        joined = f"case {int(number) - 1}.{INPUT_JOIN}input text {int(number) - 1}"
        assert joined in example["eval_prompt"] and joined in example["training_text"]


def test_cli_alpaca_shows_the_joined_input(tmp_path, capsys):
    rows = [dict(row, input=f"input text {i}") for i, row in enumerate(alpaca_rows())]
    source = write(tmp_path / "data.jsonl", rows)
    code = main(["data", "inspect", "--clients", "3", source, "model.name=tiny-random", "data.train_per_client=4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "alpaca (detected)" in out and "task = category" in out
    for task in TASKS:
        assert task in out
    assert f"{INPUT_JOIN}input text " in out  # the rendered prompt holds the input after a blank line
    assert TRAINED_OPEN in out and TRAINED_CLOSE in out


def test_cli_bad_column_is_an_error(tmp_path, capsys):
    source = write(tmp_path / "data.jsonl", alpaca_rows())
    code = main(["data", "inspect", source, "model.name=tiny-random", "data.columns.response=answer"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedrouter: error: ") and "data.columns.response" in err and "'answer'" in err

    extra = [dict(row, note="x") for row in alpaca_rows()]
    source = write(tmp_path / "extra.jsonl", extra)
    assert main(["data", "inspect", source, "model.name=tiny-random"]) == 2
    assert "['note']" in capsys.readouterr().err


def test_cli_chat_shows_its_turns(tmp_path, capsys):
    source = write(tmp_path / "chat.jsonl", chat_rows())
    args = ["data", "inspect", source, "model.name=tiny-random", "data.train_per_client=2", "--clients", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "messages (detected)" in out
    assert "no task labels" in out
    assert "a chat of 5 turns: system, user, assistant, user, assistant" in out
    # both assistant turns are trained on, the rest is context
    example = out[out.index("Training text") :]
    spans = [part.split(TRAINED_CLOSE)[0] for part in example.split(TRAINED_OPEN)[2:]]  # [1:]: the legend
    answers = [span.split("<|im_end|>")[0] for span in spans]
    assert len(answers) == 2 and answers[0] == "Hello there!" and answers[1].isdigit()
