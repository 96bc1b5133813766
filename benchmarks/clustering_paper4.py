"""Clustering accuracy of FedRouter on the real paper4 data (8 clients), per scenario and seed.

Runs the whole Flower pipeline up to global clustering (run.rounds=0, no evaluation) with the settings of
configs/paper4-raw-cpu.toml, on the paper4 data (the v1 prompts). Writes benchmarks/results/clustering-paper4.json and prints a Markdown table.

    .venv/bin/python benchmarks/clustering_paper4.py            # from the project root
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedrouter.config import load_config
from fedrouter.simulation import run_experiment

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("single", "dual", "all")
SEEDS = (0, 1)


def main() -> None:
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in SCENARIOS:
            for seed in SEEDS:
                cfg = load_config(
                    ROOT / "configs" / "paper4-raw-cpu.toml",
                    {
                        "data.source": str(ROOT.parent / "shared" / "data" / "paper4"),
                        "data.scenario": scenario,
                        "run.seed": seed,
                        "run.rounds": 0,
                        "eval.sets": "none",
                        "run.output_dir": tmp,
                        "run.name": f"{scenario}-{seed}",
                    },
                )
                started = time.time()
                _, metrics = run_experiment(cfg)
                clustering = metrics["clustering"]
                record = {
                    "scenario": scenario,
                    "seed": seed,
                    "cluster_acc_local": clustering["cluster_acc_local"],
                    "cluster_acc_global": clustering["cluster_acc_global"],
                    "local_k": clustering["local_k"],
                    "global_k": clustering["global_k"],
                    "global_cluster_tasks": clustering["global_cluster_tasks"],
                    "wall_s": round(time.time() - started, 1),
                }
                records.append(record)
                print(json.dumps(record), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    result = {
        "command": "python benchmarks/clustering_paper4.py",
        "settings": "configs/paper4-raw-cpu.toml on paper4 (8 clients, 96 train samples each, SmolLM2-135M embeddings), rounds=0",
        "commit": commit.strip(),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
        "runs": records,
    }
    out = ROOT / "benchmarks" / "results" / "clustering-paper4.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| scenario | seed | local k | global k | clustering acc. local | clustering acc. global |")
    print("|---|---|---|---|---|---|")
    for r in records:
        ks = ",".join(str(k) for _, k in sorted(r["local_k"].items(), key=lambda kv: int(kv[0])))
        print(
            f"| {r['scenario']} | {r['seed']} | {ks} | {r['global_k']} | "
            f"{r['cluster_acc_local']:.3f} | {r['cluster_acc_global']:.3f} |"
        )
    print(f"\nwritten to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
