"""Data from the Hugging Face hub, for users with internet access: a dataset id, or a recipe.

``data.source = "hf:OWNER/NAME"`` loads a hub dataset and reads its rows as a local file's (``data.format``,
``data.columns.*``). ``data.source = "hf:paper4"`` builds the paper's four tasks (QQP, WebNLG, SAMSum, GigaWord) with FLAN-style
instructions. Not exercised on the offline development machine (no hub access); the JSONL files in
``../shared/data/paper4`` were built the same way and are what the tests and benchmarks use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedrouter.data.formats import Reading, Table, table_samples
from fedrouter.data.samples import DataError, Sample


@dataclass(frozen=True)
class TaskRecipe:
    task: str
    path: str
    name: str | None
    train_split: str
    test_split: str
    to_pair: Callable[[dict], tuple[str, str] | None]


def _qqp(row: dict) -> tuple[str, str] | None:
    answer = "yes" if row["label"] == 1 else "no"
    prompt = f"{row['question1']}\n{row['question2']}\n\nAre these two questions asking the same thing?\nOPTIONS:\n- no\n- yes"
    return prompt, answer


def _webnlg(row: dict) -> tuple[str, str] | None:
    triples = "; ".join(t.replace("|", ",") for t in row["modified_triple_sets"]["mtriple_set"][0])
    texts = row["lex"]["text"]
    return (f"Generate a sentence about this data: {triples}", texts[0]) if texts else None


def _samsum(row: dict) -> tuple[str, str] | None:
    return f"Summarize this dialogue:\n{row['dialogue']}", row["summary"]


def _gigaword(row: dict) -> tuple[str, str] | None:
    return f"Write a short headline for this article:\n{row['document']}", row["summary"]


RECIPES: dict[str, list[TaskRecipe]] = {
    "paper4": [
        TaskRecipe("qqp", "nyu-mll/glue", "qqp", "train", "validation", _qqp),
        TaskRecipe("webnlg", "webnlg-challenge/web_nlg", "release_v3.0_en", "train", "dev", _webnlg),
        TaskRecipe("samsum", "knkarthick/samsum", None, "train", "test", _samsum),
        TaskRecipe("gigaword", "Harvard/gigaword", None, "train", "test", _gigaword),
    ]
}


def load_recipe(name: str, per_task: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples for a recipe, ``per_task`` training samples per task."""
    if name not in RECIPES:
        raise DataError(f"setting 'data.source': unknown recipe 'hf:{name}' (known: {', '.join(RECIPES)})")
    try:
        import datasets
    except ImportError:
        raise DataError("setting 'data.source' = 'hf:...' needs the 'datasets' package: pip install datasets") from None
    train: list[Sample] = []
    test: list[Sample] = []
    for recipe in RECIPES[name]:
        for split, target, count in (
            (recipe.train_split, train, per_task),
            (recipe.test_split, test, per_task),
        ):
            try:
                rows = datasets.load_dataset(recipe.path, recipe.name, split=split).shuffle(seed=seed)
            except Exception as err:  # no network, or the hub moved the dataset: the hub's own words
                raise DataError(f"setting 'data.source': hf:{name} could not load {recipe.path}: {err}") from None
            kept = 0
            for index, row in enumerate(rows):
                if kept == count:
                    break
                pair = recipe.to_pair(row)
                if pair is None:
                    continue
                prompt, answer = pair
                target.append(Sample(f"{recipe.task}-{split}{index}", prompt, answer, recipe.task, (answer,)))
                kept += 1
    return train, test


def load_hub(name: str, per_task: int, seed: int, reading: Reading) -> dict[str, list[Sample]]:
    """Samples per split of a recipe (``train``, ``test``), or of a hub dataset: its train and test (or
    validation) splits, or ``all`` for a dataset with a single split (held out like a single file)."""
    if name in RECIPES or "/" not in name:
        train, test = load_recipe(name, per_task, seed)
        return {"train": train, "test": test}
    import datasets

    try:
        splits = datasets.load_dataset(name)
    except Exception as err:  # no network, no such dataset, ...: the hub's own words
        raise DataError(f"setting 'data.source': could not load hf:{name}: {err}") from None
    test = "test" if "test" in splits else "validation" if "validation" in splits else None
    if "train" in splits and test:
        chosen = {"train": "train", "test": test}
    elif len(splits) == 1:
        chosen = {"all": next(iter(splits))}
    else:
        raise DataError(f"setting 'data.source': hf:{name} has splits {list(splits)}; expected train and test")
    return {
        part: table_samples(Table(f"hf:{name} (split {split})", splits[split], split), reading)[0]
        for part, split in chosen.items()
    }
