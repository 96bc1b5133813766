"""What the privacy options cost: FedRouter on the quick bench profile with noisy centroids or private updates.

For each noise level and the dual and all scenarios (the ones with local clustering to get wrong), one
FedRouter run of the quick profile (seed 0); records clustering accuracy and personalized ROUGE-1 (local and
global routing). Appends to benchmarks/results/privacy.jsonl (a finished (level, scenario) is skipped) and
writes benchmarks/results/privacy.md.

    .venv/bin/python benchmarks/privacy.py            # from the project root, about 20 minutes here

The noise is drawn from OS entropy (not the seed): one run per level, so small differences are noise too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedrouter.bench import PROFILES, append_records, commit, machine, read_records, run_settings
from fedrouter.config import Config
from fedrouter.simulation import run_experiment

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
SCENARIOS = ("dual", "all")
CLIP = 30.0  # SmolLM2 sample embeddings (mean of the last hidden layer) have L2 norms of about 30-35 on paper4
LEVELS = {
    "none": {},
    "centroids sigma=0.1": {"privacy.centroid_clip": CLIP, "privacy.centroid_noise": 0.1},
    "centroids sigma=0.3": {"privacy.centroid_clip": CLIP, "privacy.centroid_noise": 0.3},
    "centroids sigma=1": {"privacy.centroid_clip": CLIP, "privacy.centroid_noise": 1.0},
    "updates eps=1e4": {"privacy.update_clip": 0.5, "privacy.update_epsilon": 1e4},
    "updates eps=1e3": {"privacy.update_clip": 0.5, "privacy.update_epsilon": 1e3},
}


def run_level(level: str, scenario: str, data_root: Path, tmp: Path) -> dict:
    settings = run_settings(PROFILES["quick"], scenario, "fedrouter", 0, data_root) | LEVELS[level]
    settings["eval.sets"] = "personalized"  # the scores below are personalized in every scenario
    cfg = Config(settings | {"run.output_dir": str(tmp), "run.name": f"{scenario}-{level}".replace(" ", "_")})
    started = time.time()
    _, metrics = run_experiment(cfg)
    overall = metrics["evaluation"]["overall"]
    return {
        "level": level,
        "scenario": scenario,
        "settings": LEVELS[level],
        "cluster_acc_local": metrics["clustering"]["cluster_acc_local"],
        "cluster_acc_global": metrics["clustering"]["cluster_acc_global"],
        "global_k": metrics["clustering"]["global_k"],
        "rouge1_local": overall["personalized/local"]["rouge1"],
        "rouge1_global": overall["personalized/global"]["rouge1"],
        "routing_acc_global": overall["personalized/global"]["routing_acc"],
        "train_loss_last_round": metrics["rounds"][-1]["train_loss"],
        "wall_s": time.time() - started,
        "profile": "quick",
        "commit": commit(),
        "machine": machine(),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Privacy options: cost on the quick bench profile (FedRouter, seed 0)",
        "",
        "Command: `.venv/bin/python benchmarks/privacy.py`. Centroids: every sample embedding clipped to L2 norm "
        f"{CLIP:g}, noise std sigma x {CLIP:g} / cluster size. Updates: Flower's LocalDpMod, clip 0.5, "
        "delta 1e-5, per round. One run per row (the noise is not seeded); the quick profile scores 2 test "
        "samples per client and task, so ROUGE-1 differences of a few points are noise.",
        "",
        "| level | scenario | cluster acc local | cluster acc global | global k | ROUGE-1 local routing "
        "| ROUGE-1 global routing | routing acc (global) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['level']} | {row['scenario']} | {row['cluster_acc_local']:.3f} | {row['cluster_acc_global']:.3f} "
            f"| {row['global_k']} | {row['rouge1_local']:.1f} | {row['rouge1_global']:.1f} "
            f"| {row['routing_acc_global']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="holds paper4/")
    parser.add_argument("--out", type=Path, default=OUT, help="results folder")
    args = parser.parse_args()
    data_root, out = args.data, args.out
    path = out / "privacy.jsonl"
    done = {(r["level"], r["scenario"]) for r in read_records(path)}
    with tempfile.TemporaryDirectory() as tmp:
        for level in LEVELS:
            for scenario in SCENARIOS:
                if (level, scenario) in done:
                    continue
                row = run_level(level, scenario, data_root, Path(tmp))
                append_records(path, [row])
                print(json.dumps({k: row[k] for k in ("level", "scenario", "cluster_acc_global", "rouge1_local")}))
                sys.stdout.flush()
    rows = read_records(path)
    order = list(LEVELS)
    rows.sort(key=lambda r: (order.index(r["level"]), r["scenario"]))
    (out / "privacy.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
