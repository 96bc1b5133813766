"""A multi-turn chat dataset built from the shared data (benchmarks/chat_data.py), run end to end by the real CLI
on the real model: read as format 'messages', trained, clustered by each chat's last user turn, evaluated."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA

sys.path.insert(0, str(ROOT / "benchmarks"))

import chat_data

PAPER4 = SHARED_DATA / "paper4-raw"
pytestmark = pytest.mark.skipif(not (PAPER4 / "train.jsonl").is_file(), reason="no shared data (paper4-raw)")


def _fedrouter(*args: str, timeout: int) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "fedrouter"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "fedrouter.cli"]
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_chat_builder_is_deterministic_and_multi_turn(tmp_path):
    first = chat_data.build(PAPER4, "mixed", train_per_task=6, test_per_task=2, seed=3)
    assert first == chat_data.build(PAPER4, "mixed", train_per_task=6, test_per_task=2, seed=3)
    same = chat_data.build(PAPER4, "same", train_per_task=6, test_per_task=2, seed=3)
    for split in ("train", "test"):
        for mixed_row, same_row in zip(first[split], same[split], strict=True):
            assert mixed_row["id"] == same_row["id"] and mixed_row["messages"][-2:] == same_row["messages"][-2:]
    originals = {}
    for line in (PAPER4 / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        originals[row["id"]] = row
    by_instruction = {row["instruction"]: row["task"] for row in originals.values()}
    for row in first["train"]:
        turns = [m for m in row["messages"] if m["role"] != "system"]
        assert 4 <= len(turns) <= 6 and [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        source = originals[row["id"].removesuffix("-chat")]
        assert turns[-2]["content"] == source["instruction"] and turns[-1]["content"] == source["response"]
        earlier = [by_instruction[m["content"]] for m in turns[:-2] if m["role"] == "user"]
        assert earlier and all(task != row["task"] for task in earlier)  # mixed: history of other tasks
    for row in same["train"]:
        earlier = [by_instruction[m["content"]] for m in row["messages"][:-2] if m["role"] == "user"]
        assert earlier and all(task == row["task"] for task in earlier)
    paths = chat_data.write(first, tmp_path)
    written = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert written == first["train"]


@pytest.mark.slow
def test_chat_dataset_trains_clusters_and_evaluates(tmp_path):
    data, out = tmp_path / "chats", tmp_path / "runs"
    # Earlier turns of OTHER tasks: clustering by the whole chat would mix the tasks up
    # (benchmarks/results/chat_embedding.md), by the last user turn it should not.
    chat_data.write(chat_data.build(PAPER4, "mixed", train_per_task=16, test_per_task=4, seed=0), data)
    common = ["data.num_clients=4", "data.train_per_client=16", "data.test_per_task=2"]

    inspected = _fedrouter("data", "inspect", str(data), *common, "--model", "tiny-random", timeout=300)
    assert inspected.returncode == 0, inspected.stderr[-2000:]
    assert "messages (detected)" in inspected.stdout, inspected.stdout[-3000:]

    done = _fedrouter(
        "run",
        "--quiet",
        "--model",
        "smollm2",
        "--rounds",
        "1",
        "--data",
        str(data),
        "--output",
        str(out),
        "--name",
        "chat",
        *common,
        "train.local_steps=2",
        "train.batch_size=2",
        "eval.max_new_tokens=8",
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "chat" / "metrics.json").read_text())
    assert metrics["config"]["data.format"] == "auto"
    rounds = metrics["rounds"]
    losses = list(rounds[0]["train_loss"].values()) if len(rounds) == 1 else []
    assert rounds[0]["counted"] and losses and all(math.isfinite(loss) and loss > 0 for loss in losses), rounds
    clustering = metrics["clustering"]
    assert clustering["cluster_acc_global"] >= 0.9, clustering
    by_set = metrics["evaluation"]["by_set"]
    for mode in ("local", "global"):
        summary = by_set[f"personalized/{mode}"]
        assert sorted(summary["per_task"]) == ["gigaword", "qqp", "samsum", "webnlg"], summary["per_task"]
        assert 0 <= summary["rouge1"] <= 100 and summary["routing_acc"] is not None  # ROUGE in percent
