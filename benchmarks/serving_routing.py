"""Which text to embed when a chat is routed: its last user turn, or the whole conversation?

    .venv/bin/python benchmarks/serving_routing.py RUN_DIR [--data ../shared/data/paper4-raw] [--per-task 50]

RUN_DIR is a trained FedRouter run on that data (its metrics.json gives each global cluster's training tasks).
Each test input is put in three chat shapes: alone; after a system message; as a follow-up to an earlier turn of
another task (with that turn's reference answer). Each shape is routed (global mode) by embedding its last user turn
and by embedding all its messages joined. Routing accuracy: share of prompts sent to a global cluster whose majority
training task is their own task (as the run's evaluation scores it). Writes benchmarks/results/serving-routing.json.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from fedrouter.bench import commit, machine
from fedrouter.serving.router import Route, Router, routing_text

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "serving-routing.json"
SYSTEM = "You are a helpful assistant. Answer concisely."


def test_samples(path: Path, per_task: int) -> list[dict]:
    by_task: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        by_task.setdefault(sample["task"], []).append(sample)
    return [s for task in sorted(by_task) for s in by_task[task][:per_task]]


def shapes(sample: dict, earlier: dict) -> dict[str, list[dict]]:
    question = {"role": "user", "content": sample["instruction"]}
    return {
        "one turn": [question],
        "system + turn": [{"role": "system", "content": SYSTEM}, question],
        "follow-up to another task": [
            {"role": "user", "content": earlier["instruction"]},
            {"role": "assistant", "content": earlier["response"]},
            question,
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper4-raw")
    parser.add_argument("--per-task", type=int, default=50)
    args = parser.parse_args()

    router = Router.load(args.run_dir)
    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    majority = {
        int(g): Counter(tasks).most_common(1)[0][0]
        for g, tasks in metrics["clustering"]["global_cluster_tasks"].items()
    }
    samples = test_samples(args.data / "test.jsonl", args.per_task)
    rng = random.Random(0)
    results: dict[str, dict[str, float]] = {}
    for shape in ("one turn", "system + turn", "follow-up to another task"):
        chats = []
        for sample in samples:
            earlier = rng.choice([s for s in samples if s["task"] != sample["task"]])
            chats.append(shapes(sample, earlier)[shape])
        texts = {
            "last user turn": [routing_text(chat) for chat in chats],
            "whole conversation": ["\n\n".join(m["content"] for m in chat) for chat in chats],
        }
        results[shape] = {}
        for embedded, prompts in texts.items():
            choices = router.choose(prompts, [Route("global")] * len(prompts))
            hits = sum(majority.get(c.adapter) == s["task"] for c, s in zip(choices, samples, strict=True))
            results[shape][embedded] = round(hits / len(samples), 4)
            print(f"{shape:28s} {embedded:20s} routing accuracy {hits / len(samples):.3f}", flush=True)
    record = {
        "command": "python benchmarks/serving_routing.py "
        + " ".join([str(args.run_dir), "--data", str(args.data), "--per-task", str(args.per_task)]),
        "commit": commit(OUT.parent),  # other results written there are no change of the code
        "machine": machine(),
        "run": str(args.run_dir),
        "global_clusters": router.num_adapters,
        "prompts": len(samples),
        "routing_accuracy": results,
        "system_message": SYSTEM,
    }
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
