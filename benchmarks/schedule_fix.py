"""FedRouter and the oracle router before and after the round-robin fix (ca24bb9), on the same runs of paper4-cpu.

Before the fix every client started its round-robin at its client id; in `dual` that trained only two of the four
global clusters in each round (see `balanced_offsets`). The runs made before it are kept in
`benchmarks/results/paper4-cpu-superseded.jsonl`; the reruns are in `paper4-cpu.jsonl`. Reads those two files
only and prints a Markdown table: ROUGE-1 per (scenario, seed, method, routing), personalized evaluation (FedRouter:
local routing; oracle: task routing), the number of global clusters updated in each round, and the per-task scores (before → after).

    .venv/bin/python benchmarks/schedule_fix.py            # from the project root
"""

from __future__ import annotations

from pathlib import Path

from fedrouter.bench import read_records

RESULTS = Path(__file__).resolve().parent / "results"
ROUTING = {"fedrouter": "local", "oracle": "task"}


def _personalized(path: Path) -> dict[tuple, dict]:
    return {
        (r["scenario"], r["seed"], r["method"]): r
        for r in read_records(path)
        if r["method"] in ROUTING and r["eval_mode"] == "personalized" and r.get("routing") == ROUTING[r["method"]]
    }


def _updated(record: dict) -> str:
    """How many global clusters got an update in each round (the keys of the round's training losses)."""
    return "/".join(str(len(losses)) for losses in record["train_loss_per_round"])


def main() -> None:
    before = _personalized(RESULTS / "paper4-cpu-superseded.jsonl")
    after = _personalized(RESULTS / "paper4-cpu.jsonl")
    print("| scenario | seed | method | clusters updated per round | ROUGE-1 before | after | change | per task |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(before.keys() & after.keys()):
        old, new = before[key], after[key]
        tasks = ", ".join(
            f"{task} {old['rouge1_per_task'][task]:.1f} → {new['rouge1_per_task'][task]:.1f}"
            for task in sorted(new["rouge1_per_task"])
        )
        updated = f"{_updated(old)} → {_updated(new)}"
        scores = f"{old['rouge1']:.1f} | {new['rouge1']:.1f} | {new['rouge1'] - old['rouge1']:+.1f}"
        print(f"| {' | '.join(map(str, key))} | {updated} | {scores} | {tasks} |")
    waiting = sorted(before.keys() - after.keys())
    if waiting:
        print(f"\nnot rerun yet: {', '.join(f'{s} seed {n} {m}' for s, n, m in waiting)}")


if __name__ == "__main__":
    main()
