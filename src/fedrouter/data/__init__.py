"""Task data: samples, file formats, the synthetic source, hub recipes and scenario splits."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from fedrouter.config import Config
from fedrouter.data import synthetic
from fedrouter.data.partition import ClientData, by_task, split_clients
from fedrouter.data.samples import DataError, Sample, load_file

__all__ = ["ClientData", "DataError", "Sample", "client_data", "load_source", "node_data"]


def _find_split(folder: Path, split: str) -> Path:
    for suffix in (".jsonl", ".csv"):
        if (folder / f"{split}{suffix}").exists():
            return folder / f"{split}{suffix}"
    raise DataError(f"setting 'data.source': folder {folder} has no {split}.jsonl or {split}.csv")


def _holdout_split(samples: list[Sample], seed: int) -> tuple[list[Sample], list[Sample]]:
    """One file: a fifth of every task becomes the test split."""
    train, test = [], []
    for task, group in by_task(samples).items():
        group = sorted(group, key=lambda s: s.id)
        random.Random(f"{seed}-{task}").shuffle(group)
        cut = max(1, len(group) // 5)
        test += group[:cut]
        train += group[cut:]
    return train, test


@functools.lru_cache(maxsize=4)
def _load(source: str, synthetic_size: int, seed: int, tasks: str) -> tuple[tuple[Sample, ...], tuple[Sample, ...]]:
    if source == "synthetic":
        train, test = synthetic.generate(synthetic_size, seed=0)  # the dataset itself does not vary with the seed
    elif source.startswith("hf:"):
        from fedrouter.data.hub import load_recipe

        train, test = load_recipe(source[3:], synthetic_size, seed)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            train, test = load_file(_find_split(path, "train")), load_file(_find_split(path, "test"))
        elif path.is_file():
            train, test = _holdout_split(load_file(path), seed)
        else:
            raise DataError(
                f"setting 'data.source': {source!r} is not 'synthetic', 'hf:RECIPE', an existing file or a folder"
            )
    keep = [t.strip() for t in tasks.split(",") if t.strip()]
    if keep:
        known = {s.task for s in train}
        unknown = [t for t in keep if t not in known]
        if unknown:
            raise DataError(f"setting 'data.tasks': no training samples of {unknown} (tasks: {sorted(known)})")
        train = [s for s in train if s.task in keep]
        test = [s for s in test if s.task in keep]
    return tuple(train), tuple(test)


def load_source(cfg: Config) -> tuple[list[Sample], list[Sample]]:
    """The configured source's (train, test) samples; cached per process."""
    train, test = _load(cfg["data.source"], cfg["data.synthetic_size"], cfg["run.seed"], cfg["data.tasks"])
    return list(train), list(test)


def all_clients(cfg: Config) -> list[ClientData]:
    """Every client's data under the configured scenario (deterministic from ``run.seed``)."""
    train, test = load_source(cfg)
    return split_clients(
        train,
        test,
        num_clients=cfg["data.num_clients"],
        scenario=cfg["data.scenario"],
        train_per_client=cfg["data.train_per_client"],
        test_per_task=cfg["data.test_per_task"],
        test_overrides=cfg.task_overrides("data.test_per_task_overrides"),
        eval_sets=cfg.eval_sets,
        seed=cfg["run.seed"],
    )


def client_data(cfg: Config, client_id: int) -> ClientData:
    """One client's partition."""
    if not 0 <= client_id < cfg["data.num_clients"]:
        raise DataError(f"client {client_id} is outside 0..{cfg['data.num_clients'] - 1} ('data.num_clients')")
    return all_clients(cfg)[client_id]


def node_data(cfg: Config, client_id: int, path: str) -> ClientData:
    """A deployment node's own data (node config ``data-path``: a folder with train/test files, or one file).

    Every training sample is the node's; the personalized test set holds the test samples of the tasks it
    trains on, the generalization set those of every task in its test file (``data.test_per_task`` each).
    """
    if not Path(path).expanduser().exists():
        raise DataError(f"node config 'data-path': {path} does not exist")
    train, test = (
        list(part) for part in _load(str(path), cfg["data.synthetic_size"], cfg["run.seed"], cfg["data.tasks"])
    )
    if not train:
        raise DataError(f"node config 'data-path': {path} holds no training samples")
    tasks = list(by_task(train))
    client = ClientData(client_id, tasks, train)
    test_groups = by_task(test)
    overrides = cfg.task_overrides("data.test_per_task_overrides")
    for name in cfg.eval_sets:
        chosen: list[Sample] = []
        for task in tasks if name == "personalized" else list(test_groups):
            pool = test_groups.get(task, [])
            if not pool:
                raise DataError(f"node config 'data-path': {path} has no test samples of task '{task}'")
            chosen += pool[: overrides.get(task, cfg["data.test_per_task"])]
        client.tests[name] = chosen
    return client
