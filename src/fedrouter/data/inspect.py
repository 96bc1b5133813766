"""``fedrouter data inspect``: what was read from a data source, before any training.

``inspect_report`` gathers it as a plain dict (format and column map of every table, rows per split, samples
per task and per client after partitioning, token lengths, and one sample rendered the way training and
evaluation see it); ``print_report`` shows that dict on the console.
"""

from __future__ import annotations

import statistics
from typing import Any

from fedrouter.config import Config
from fedrouter.data import all_clients, client_sources, labelled, read_samples, source_samples, task_counts
from fedrouter.data.formats import Reading
from fedrouter.data.samples import NO_TASK, Sample
from fedrouter.errors import ModelError

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"  # around the tokens the loss covers, in the console's training text


def load_tokenizer(name: str):
    """The tokenizer of ``model.name`` without its weights (``tiny-random`` has SmolLM2's)."""
    from transformers import AutoTokenizer

    from fedrouter.model.loading import check_model_name, resolve_folder

    check_model_name(name)
    folder = resolve_folder("smollm2" if name == "tiny-random" else name)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelError(f"setting 'model.name' = {name!r}: no loadable tokenizer ({err})") from err


def inspect_report(cfg: Config, tokenizer=None) -> dict[str, Any]:
    """Everything ``fedrouter data inspect`` shows, as plain data. Raises the errors ``fedrouter run`` would."""
    reading = Reading.from_config(cfg)
    files = cfg["data.partition"] == "files"
    sources = [str(path) for path in client_sources(cfg)] if files else [cfg["data.source"]]
    entries, train, test = [], [], []
    for source in sources:
        parts = read_samples(source, reading, cfg["data.synthetic_size"], cfg["run.seed"])
        own_train, own_test = source_samples(cfg, source)
        train += own_train
        test += own_test
        entries.append(
            {
                "source": source,
                "tables": [
                    {
                        "where": where,
                        "format": layout.format,
                        "detected": layout.detected,
                        "columns": dict(layout.columns),
                        "ignored": list(layout.ignored),
                        "layout": layout.describe(),
                    }
                    for where, layout in parts["layouts"]
                ],
                "rows": {split: len(rows) for split, rows in parts.items() if split != "layouts"},
                "split": _split_note(source, parts, cfg),
                "train": len(own_train),
                "test": len(own_test),
            }
        )
    report: dict[str, Any] = {
        "source": cfg["data.source"],
        "partition": cfg["data.partition"],
        "num_clients": cfg["data.num_clients"],
        "model": cfg["model.name"],
        "max_seq_len": cfg["model.max_seq_len"],
        "kept_tasks": [t.strip() for t in cfg["data.tasks"].split(",") if t.strip()],
        "sources": entries,
        "train": len(train),
        "test": len(test),
        "tasks": None,
        "clients": None,
        "clients_note": None,
    }
    if labelled(train):
        tests = task_counts(test)
        report["tasks"] = {task: {"train": n, "test": tests.get(task, 0)} for task, n in task_counts(train).items()}
    if cfg["data.num_clients"] == 0:
        report["clients_note"] = (
            "data.num_clients = 0: `flwr run` makes one client per SuperNode; set data.num_clients=N to see a partition"
        )
    else:
        report["clients"] = [
            {
                "client": client.client_id,
                "train": len(client.train),
                "tasks": task_counts(client.train),
                "tests": {name: len(samples) for name, samples in client.tests.items()},
            }
            for client in all_clients(cfg)
        ]
    tokenizer = tokenizer or load_tokenizer(cfg["model.name"])
    report["tokens"] = token_lengths(tokenizer, train, test, cfg["model.max_seq_len"])
    report["example"] = example(tokenizer, train[0], cfg["model.max_seq_len"]) if train else None
    return report


def _split_note(source: str, parts: dict, cfg: Config) -> str:
    if source == "synthetic":
        return "generated train and test splits"
    if source.startswith("hf:"):
        return "the hub dataset's train and test splits"
    if "all" not in parts:
        return "its own train and test splits"
    per_client = any(s.client for s in parts["all"])
    return (
        f"no test split: a fifth of every task{' of every client' if per_client else ''} (at least one sample) "
        f"held out for testing, drawn with run.seed = {cfg['run.seed']}"
    )


def _prompt_texts(tokenizer, samples: list[Sample]) -> list[list[int]]:
    from fedrouter.model.prompts import render_chat

    texts = [render_chat(tokenizer, _messages(s.prompt)) for s in samples]
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _messages(prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def token_lengths(tokenizer, train: list[Sample], test: list[Sample], max_len: int) -> dict[str, Any]:
    """Prompt (with the chat template) and answer lengths in tokens, and how many samples get shortened.

    Training keeps at most half of ``max_len`` of an answer (plus the end token) and fits the prompt into the
    rest (``training_ids``); evaluation fits a test prompt into ``max_len`` tokens (``prompt_ids``).
    """
    prompts = [len(ids) for ids in _prompt_texts(tokenizer, train)]
    answers = [len(ids) for ids in tokenizer([s.response for s in train], add_special_tokens=False)["input_ids"]]
    half = max_len // 2
    answer_cut = sum(a > half for a in answers)
    prompt_cut = sum(p > max_len - min(a, half) - 1 for p, a in zip(prompts, answers, strict=True))
    shortened = sum(a > half or p > max_len - min(a, half) - 1 for p, a in zip(prompts, answers, strict=True))
    test_prompts = [len(ids) for ids in _prompt_texts(tokenizer, test)]
    return {
        "prompt": _spread(prompts),
        "answer": _spread(answers),
        "train_samples": len(train),
        "shortened": shortened,
        "prompt_shortened": prompt_cut,
        "answer_shortened": answer_cut,
        "test_prompt": _spread(test_prompts),
        "test_prompts_shortened": sum(p > max_len for p in test_prompts),
    }


def example(tokenizer, sample: Sample, max_len: int) -> dict[str, Any]:
    """One sample as training sees it (its tokens, the trained ones marked) and as evaluation asks it."""
    from fedrouter.model.prompts import prompt_ids, training_ids

    ids, labels = training_ids(tokenizer, sample.prompt, sample.response, max_len)
    segments: list[dict[str, Any]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (labels[end] != -100) != (labels[start] != -100):
            segments.append({"trained": labels[start] != -100, "text": tokenizer.decode(ids[start:end])})
            start = end
    asked = prompt_ids(tokenizer, sample.prompt, max_len)
    return {
        "id": sample.id,
        "task": sample.task,
        "client": sample.client,
        "turns": len(sample.context) + 2 if sample.context else None,  # with the last user turn and the answer
        "roles": [role for role, _ in sample.context] + ["user", "assistant"] if sample.context else None,
        "training_tokens": len(ids),
        "trained_tokens": sum(label != -100 for label in labels),
        "training_text": tokenizer.decode(ids),
        "segments": segments,
        "eval_tokens": len(asked),
        "eval_prompt": tokenizer.decode(asked),
        "response": sample.response,
    }


# --- the console ------------------------------------------------------------------------------------------


def print_report(report: dict[str, Any], console=None) -> None:
    """``inspect_report``'s dict for a person: tables, and the example's text exactly as the model sees it."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    console.print(
        Text.assemble(
            ("data ", "bold"),
            (report["source"], "bold cyan"),
            f"  (partition {report['partition']}, {report['num_clients']} clients, model {report['model']}, "
            f"model.max_seq_len {report['max_seq_len']})",
        )
    )

    tables = Table(title="What was read", title_justify="left")
    for column in ("file / split", "format", "columns (role = column)", "ignored"):
        tables.add_column(column, overflow="fold")
    for entry in report["sources"]:
        if not entry["tables"]:
            tables.add_row(Text(entry["source"]), "built in", Text(entry["split"]), "")
        for table in entry["tables"]:
            how = "detected" if table["detected"] else "data.format"
            columns = ", ".join(f"{role} = {column}" for role, column in table["columns"].items())
            tables.add_row(
                Text(table["where"]), f"{table['format']} ({how})", Text(columns), Text(", ".join(table["ignored"]))
            )
    console.print(tables)

    for entry in report["sources"]:
        rows = ", ".join(f"{split} {n}" for split, n in entry["rows"].items())
        where = f"{entry['source']}: " if len(report["sources"]) > 1 else ""
        console.print(Text(f"{where}rows {rows}; {entry['split']} -> train {entry['train']}, test {entry['test']}"))
    if report["kept_tasks"]:
        console.print(Text(f"data.tasks keeps {', '.join(report['kept_tasks'])}"))
    console.print(f"samples: train {report['train']}, test {report['test']}")

    if report["tasks"] is None:
        console.print("tasks: no task labels (scenarios deal samples at random; no per-task scores)")
    else:
        tasks = Table(title="Samples per task", title_justify="left")
        tasks.add_column("task")
        tasks.add_column("train", justify="right")
        tasks.add_column("test", justify="right")
        for task, counts in report["tasks"].items():
            tasks.add_row(Text(task), str(counts["train"]), str(counts["test"]))
        console.print(tasks)

    if report["clients"] is None:
        console.print(Text(report["clients_note"]))
    else:
        names = sorted({name for client in report["clients"] for name in client["tests"]})
        clients = Table(title=f"Clients (data.partition = {report['partition']})", title_justify="left")
        clients.add_column("client", justify="right")
        clients.add_column("train", justify="right")
        clients.add_column("tasks (train samples)", overflow="fold")
        for name in names:
            clients.add_column(f"{name} tests", justify="right")
        for client in report["clients"]:
            held = ", ".join(f"{task} {n}" for task, n in client["tasks"].items())
            clients.add_row(
                str(client["client"]),
                str(client["train"]),
                Text(held),
                *(str(client["tests"].get(name, 0)) for name in names),
            )
        console.print(clients)

    tokens = report["tokens"]
    lengths = Table(title=f"Lengths in tokens ({report['model']} tokenizer)", title_justify="left")
    for column in ("", "min", "median", "max"):
        lengths.add_column(column, justify="right" if column else "left")
    for label, key in (
        ("train prompt (templated)", "prompt"),
        ("train answer", "answer"),
        ("test prompt", "test_prompt"),
    ):
        spread = tokens[key]
        if spread:
            lengths.add_row(label, *(f"{spread[k]:g}" for k in ("min", "median", "max")))
    console.print(lengths)
    max_len = report["max_seq_len"]
    console.print(
        f"{tokens['shortened']} of {tokens['train_samples']} training samples exceed model.max_seq_len = {max_len} "
        f"and are shortened ({tokens['prompt_shortened']} prompts cut, {tokens['answer_shortened']} answers cut to "
        f"{max_len // 2} tokens); {tokens['test_prompts_shortened']} test prompts are cut at evaluation"
    )

    sample = report["example"]
    if sample is None:
        return
    about = [f"id {sample['id']}"]
    if sample["task"] != NO_TASK:
        about.append(f"task {sample['task']}")
    if sample["client"] is not None:
        about.append(f"client {sample['client']}")
    if sample["turns"]:
        about.append(f"a chat of {sample['turns']} turns: {', '.join(sample['roles'])}")
    console.rule("Example: the first training sample")
    console.print(Text("; ".join(about)), soft_wrap=True)
    console.print(
        Text(
            f"Training text, {sample['training_tokens']} tokens; the {sample['trained_tokens']} trained on (the loss "
            f"covers them) are between {TRAINED_OPEN} {TRAINED_CLOSE}:",
            style="bold",
        )
    )
    text = Text()
    for segment in sample["segments"]:
        if segment["trained"]:
            text.append(TRAINED_OPEN + segment["text"] + TRAINED_CLOSE, style="bold green")
        else:
            text.append(segment["text"])
    console.print(text, soft_wrap=True)
    console.print(
        Text(f"Evaluation prompt, {sample['eval_tokens']} tokens (the model's answer follows it):", style="bold")
    )
    console.print(Text(sample["eval_prompt"]), soft_wrap=True)
    console.print(Text("Gold answer (scored against the generated one):", style="bold"))
    console.print(Text(sample["response"]), soft_wrap=True)
