"""A multi-turn chat dataset built from single-turn JSONL data (the shared data's paper4-raw, flan16, extra).

    .venv/bin/python benchmarks/chat_data.py --data ../shared/data/paper4-raw --out chats/ [--history same|mixed]
        [--train-per-task 60] [--test-per-task 20] [--tasks qqp,webnlg] [--seed 0]

Each chosen sample becomes one chat: (usually) a generic system prompt, then 1-2 earlier user/assistant exchanges
drawn from OTHER samples of the same split, then the sample's own instruction as the last user turn and its
response as the answer (its references kept). ``--history same``: the earlier exchanges are of the sample's own
task (a user asking several questions of one kind); ``--history mixed``: each is of a different task, so the chat's
earlier turns say nothing, or something misleading, about the task of its last turn. The system prompts never
depend on the task. Train chats draw their history from the train split, test chats from the test split, so no
test instruction appears in training data.

Writes ``train.jsonl`` and ``test.jsonl`` in OpenAI messages format (``{"id", "task", "messages",
"references"}``) through ``datasets``, the reader FedRouter itself uses. Same arguments, same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HISTORIES = ("same", "mixed")
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer concisely.",
    "You are a careful assistant. Follow the user's instructions exactly.",
    "Answer the user's requests as briefly as you can.",
)
SYSTEM_SHARE = 0.75  # chats that open with a system prompt
EARLIER = (1, 2)  # earlier user/assistant exchanges per chat, fewest and most


def read_split(path: Path) -> dict[str, list[dict]]:
    """A single-turn JSONL file's rows per task, in file order."""
    by_task: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            by_task.setdefault(row["task"], []).append(row)
    return by_task


def chat_rows(
    by_task: dict[str, list[dict]],
    per_task: int,
    history: str,
    pick: random.Random,
    rng: random.Random,
    tasks: list[str] | None = None,
) -> list[dict]:
    """``per_task`` chats of each task (sorted), each ending with one sample's instruction and response.

    ``pick`` chooses the samples, ``rng`` the system prompts and the history: with the same ``pick`` seed both
    histories end in the same samples.
    """
    if history not in HISTORIES:
        raise ValueError(f"history {history!r}: expected one of {HISTORIES}")
    tasks = sorted(tasks or by_task)
    missing = [t for t in tasks if t not in by_task]
    if missing:
        raise ValueError(f"tasks {missing} are not in the data (it has {sorted(by_task)})")
    if history == "mixed" and len(tasks) < 2:
        raise ValueError("a mixed history needs at least two tasks")
    rows = []
    for task in tasks:
        pool = by_task[task]
        if len(pool) < 1 + EARLIER[1] and history == "same":
            raise ValueError(f"task {task!r} has {len(pool)} samples: too few for a same-task history")
        for index in sorted(pick.sample(range(len(pool)), min(per_task, len(pool)))):
            sample = pool[index]
            messages = []
            if rng.random() < SYSTEM_SHARE:
                messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
            for _ in range(rng.randint(*EARLIER)):
                if history == "same":
                    earlier = pool[rng.choice([i for i in range(len(pool)) if i != index])]
                else:
                    earlier = rng.choice(by_task[rng.choice([t for t in tasks if t != task])])
                messages += [
                    {"role": "user", "content": earlier["instruction"]},
                    {"role": "assistant", "content": earlier["response"]},
                ]
            messages += [
                {"role": "user", "content": sample["instruction"]},
                {"role": "assistant", "content": sample["response"]},
            ]
            references = sample.get("references") or [sample["response"]]
            rows.append({"id": f"{sample['id']}-chat", "task": task, "messages": messages, "references": references})
    return rows


def build(
    data: Path,
    history: str = "same",
    train_per_task: int = 60,
    test_per_task: int = 20,
    tasks: list[str] | None = None,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """The chat rows of both splits (deterministic in ``seed``; both histories end in the same samples)."""
    rows = {}
    for split, per_task in (("train", train_per_task), ("test", test_per_task)):
        pick, rng = random.Random(f"{seed}-{split}"), random.Random(f"{seed}-{split}-{history}")
        rows[split] = chat_rows(read_split(data / f"{split}.jsonl"), per_task, history, pick, rng, tasks)
    return rows


def write(rows: dict[str, list[dict]], out: Path) -> dict[str, Path]:
    """``train.jsonl`` and ``test.jsonl`` in ``out``, written by ``datasets``."""
    import datasets

    datasets.disable_progress_bars()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, split_rows in rows.items():
        paths[split] = out / f"{split}.jsonl"
        datasets.Dataset.from_list(split_rows).to_json(str(paths[split]), force_ascii=False)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper4-raw")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--history", choices=HISTORIES, default="same")
    parser.add_argument("--train-per-task", type=int, default=60)
    parser.add_argument("--test-per-task", type=int, default=20)
    parser.add_argument("--tasks", default="", help="comma-separated tasks to keep (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    rows = build(args.data, args.history, args.train_per_task, args.test_per_task, tasks, args.seed)
    for split, path in write(rows, args.out).items():
        print(f"{path}: {len(rows[split])} chats")


if __name__ == "__main__":
    main()
