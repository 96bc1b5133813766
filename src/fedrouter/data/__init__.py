"""Task data: samples, the formats users hold them in, the synthetic source, hub recipes, and how samples are
dealt to clients (``data.partition``)."""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter
from pathlib import Path

from fedrouter.config import Config
from fedrouter.data import synthetic
from fedrouter.data.formats import SUFFIXES, Layout, Reading, read_source, table_samples
from fedrouter.data.partition import ClientData, by_task, dirichlet_shares, split_clients
from fedrouter.data.samples import NO_TASK, DataError, Sample

__all__ = ["ClientData", "DataError", "Sample", "all_clients", "client_data", "load_source", "node_data"]

log = logging.getLogger("fedrouter")


@functools.lru_cache(maxsize=8)
def read_samples(source: str, reading: Reading, synthetic_size: int, seed: int) -> dict[str, tuple]:
    """A source's samples per split (``train``/``test``, or ``all`` for data without a split) and, for files,
    the layout each table was read with."""
    if source == "synthetic":
        train, test = synthetic.generate(synthetic_size, seed=0)  # the dataset itself does not vary with the seed
        return {"train": tuple(train), "test": tuple(test), "layouts": ()}
    if source.startswith("hf:"):
        from fedrouter.data.hub import load_hub

        parts = load_hub(source[3:], synthetic_size, seed, reading)
        return {**{part: tuple(samples) for part, samples in parts.items()}, "layouts": ()}
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"setting 'data.source': {source!r} is not 'synthetic', 'hf:NAME', an existing file or a folder"
        )
    split: dict[str, tuple] = {}
    layouts: list[tuple[str, Layout]] = []
    for name, tables in read_source(path, reading).items():
        samples: list[Sample] = []
        for table in tables:
            rows, layout = table_samples(table, reading)
            samples += rows
            layouts.append((table.where, layout))
        split[name] = tuple(samples)
    for where, layout in layouts:
        log.info("data: %s: %s", where, layout.describe())
    return {**split, "layouts": tuple(layouts)}


def holdout_split(samples: list[Sample], seed: int) -> tuple[list[Sample], list[Sample]]:
    """Data without a test split: a fifth of every task (of every client's task, where rows name a client)
    becomes the test split, at least one sample each."""
    train, test = [], []
    groups: dict[tuple, list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.client or "", sample.task), []).append(sample)
    for (client, task), group in groups.items():
        group = sorted(group, key=lambda s: s.id)
        random.Random(f"{seed}-{task}" if not client else f"{seed}-{client}-{task}").shuffle(group)
        cut = max(1, len(group) // 5)
        test += group[:cut]
        train += group[cut:]
    return train, test


@functools.lru_cache(maxsize=8)
def _load(
    source: str, reading: Reading, synthetic_size: int, seed: int, tasks: str, unseen: str = ""
) -> tuple[tuple, tuple]:
    parts = read_samples(source, reading, synthetic_size, seed)
    if "all" in parts:
        train, test = holdout_split(list(parts["all"]), seed)
    else:
        train, test = list(parts["train"]), list(parts["test"])
    keep = [t.strip() for t in tasks.split(",") if t.strip()]
    if keep:
        known = {s.task for s in train}
        unknown = [t for t in keep if t not in known]
        if unknown:
            raise DataError(f"setting 'data.tasks': no training samples of {unknown} (tasks: {sorted(known)})")
        train = [s for s in train if s.task in keep]
        test = [s for s in test if s.task in keep]
    held_out = [t.strip() for t in unseen.split(",") if t.strip()]
    if held_out:  # no client trains on them; the generalization test set still asks them
        known = {s.task for s in train}
        unknown = [t for t in held_out if t not in known]
        if unknown:
            raise DataError(f"setting 'data.unseen_tasks': no training samples of {unknown} (tasks: {sorted(known)})")
        if known <= set(held_out):
            raise DataError("setting 'data.unseen_tasks' holds every task out of training: keep at least one")
        train = [s for s in train if s.task not in held_out]
    return tuple(train), tuple(test)


def source_samples(cfg: Config, source: str | None = None) -> tuple[list[Sample], list[Sample]]:
    """(train, test) samples of ``source`` (default: ``data.source``) read as the settings say; cached."""
    train, test = _load(
        source or cfg["data.source"], Reading.from_config(cfg), cfg["data.synthetic_size"], cfg["run.seed"],
        cfg["data.tasks"], cfg["data.unseen_tasks"],
    )  # fmt: skip
    return list(train), list(test)


def load_source(cfg: Config) -> tuple[list[Sample], list[Sample]]:
    """The configured source's (train, test) samples; cached per process."""
    return source_samples(cfg)


def source_layouts(cfg: Config) -> list[tuple[str, Layout]]:
    """How each table of the configured source was read: (file or split, its format and column map)."""
    reading = Reading.from_config(cfg)
    sources = client_sources(cfg) if cfg["data.partition"] == "files" else [cfg["data.source"]]
    return [
        layout
        for source in sources
        for layout in read_samples(str(source), reading, cfg["data.synthetic_size"], cfg["run.seed"])["layouts"]
    ]


def data_notes(cfg: Config) -> list[str]:
    """What the user should know about how their data is read: each table's format and column map, and a
    scenario that cannot apply."""
    notes = [f"{where}: {layout.describe()}" for where, layout in source_layouts(cfg)]
    if cfg["data.partition"] == "scenario" and cfg["data.scenario"] != "iid" and not labelled(load_source(cfg)[0]):
        notes.append(f"no task labels, so data.scenario {cfg['data.scenario']!r} deals samples at random (as 'iid')")
    return notes


def labelled(samples: list[Sample]) -> bool:
    """Whether the data names tasks (clustering and routing accuracy, per-task tables and scenarios need it)."""
    return any(s.task != NO_TASK for s in samples)


def all_clients(cfg: Config) -> list[ClientData]:
    """Every client's data under the configured partition (deterministic from ``run.seed``)."""
    partition = cfg["data.partition"]
    if partition == "files":
        return [node_data(cfg, i, str(path)) for i, path in enumerate(client_sources(cfg))]
    train, test = load_source(cfg)
    if partition == "column":
        return _column_clients(cfg, train, test)
    if partition == "dirichlet":
        if not labelled(train):
            raise DataError("setting 'data.partition' = 'dirichlet' deals samples by task: the data has no task labels")
        shares = dirichlet_shares(
            [s.task for s in train], cfg["data.num_clients"], cfg["data.dirichlet_alpha"], cfg["run.seed"]
        )
        return [_own_client(cfg, i, [train[j] for j in rows], test) for i, rows in enumerate(shares)]
    scenario = cfg["data.scenario"]
    if not labelled(train) and scenario != "iid":
        log.info("data: no task labels, so data.scenario %r deals samples at random (as 'iid')", scenario)
        scenario = "iid"
    return split_clients(
        train,
        test,
        num_clients=cfg["data.num_clients"],
        scenario=scenario,
        train_per_client=cfg["data.train_per_client"],
        test_per_task=cfg["data.test_per_task"],
        test_overrides=cfg.task_overrides("data.test_per_task_overrides"),
        eval_sets=cfg.eval_sets,
        seed=cfg["run.seed"],
    )


def client_sources(cfg: Config) -> list[Path]:
    """``data.partition = 'files'``: the data files and folders in ``data.source``, one per client, by name."""
    folder = Path(cfg["data.source"]).expanduser()
    if not folder.is_dir():
        raise DataError(f"setting 'data.source': data.partition = 'files' needs a folder, {folder} is not one")
    entries = sorted(
        (p for p in folder.iterdir() if p.is_dir() or p.suffix.lower() in SUFFIXES), key=lambda p: _natural(p.name)
    )
    if len(entries) != cfg["data.num_clients"]:
        names = ", ".join(p.name for p in entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise DataError(
            f"setting 'data.num_clients' = {cfg['data.num_clients']}, but {folder} holds {len(entries)} client "
            f"files or folders ({names}): set data.num_clients={len(entries)}"
        )
    return entries


def _natural(name: str) -> tuple:
    """``client2`` before ``client10``."""
    import re

    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _column_clients(cfg: Config, train: list[Sample], test: list[Sample]) -> list[ClientData]:
    """One client per value of the client column, holding every training sample of that value."""
    unnamed = sum(s.client is None for s in train)
    if unnamed:
        raise DataError(
            f"setting 'data.partition' = 'column': {unnamed} of {len(train)} training samples name no client "
            "(set data.columns.client to the column that does)"
        )
    names = sorted({s.client for s in train}, key=_natural)
    if len(names) != cfg["data.num_clients"]:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise DataError(
            f"setting 'data.num_clients' = {cfg['data.num_clients']}, but the client column names {len(names)} "
            f"clients ({shown}): set data.num_clients={len(names)}"
        )
    own_tests = any(s.client is not None for s in test)
    clients = []
    for i, name in enumerate(names):
        mine = [s for s in test if s.client == name] if own_tests else test
        clients.append(_own_client(cfg, i, [s for s in train if s.client == name], test, personal=mine))
    return clients


def _own_client(
    cfg: Config, client_id: int, train: list[Sample], test: list[Sample], personal: list[Sample] | None = None,
    where: str = "the test data",
) -> ClientData:  # fmt: skip
    """A client that holds all of ``train``: its personalized tests are drawn from ``personal`` (default: the
    test samples of the tasks it trains on), its generalization tests from every task of ``test``
    (``data.test_per_task`` each)."""
    if not train:
        raise DataError(f"client {client_id} holds no training samples")
    tasks = list(by_task(train))
    client = ClientData(client_id, tasks, train)
    overrides = cfg.task_overrides("data.test_per_task_overrides")
    for name in cfg.eval_sets:
        groups = by_task(test if name == "generalization" or personal is None else personal)
        chosen: list[Sample] = []
        for task in tasks if name == "personalized" else list(groups):
            pool = groups.get(task, [])
            if not pool:
                raise DataError(f"{where} has no test samples of task '{task}' for client {client_id}")
            chosen += pool[: overrides.get(task, cfg["data.test_per_task"])]
        client.tests[name] = chosen
    return client


def client_data(cfg: Config, client_id: int) -> ClientData:
    """One client's partition."""
    if not 0 <= client_id < cfg["data.num_clients"]:
        raise DataError(f"client {client_id} is outside 0..{cfg['data.num_clients'] - 1} ('data.num_clients')")
    return all_clients(cfg)[client_id]


def node_data(cfg: Config, client_id: int, path: str) -> ClientData:
    """A client's own data (node config ``data-path`` in a deployment, or one entry of a 'files' partition): a
    folder with train/test files, or one file of which a fifth of each task is held out for testing.

    Every training sample is the client's; the personalized test set holds the test samples of the tasks it
    trains on, the generalization set those of every task in its test data (``data.test_per_task`` each).
    """
    if not Path(path).expanduser().exists():
        raise DataError(f"data path {path} does not exist")
    train, test = source_samples(cfg, str(path))
    if not train:
        raise DataError(f"{path} holds no training samples")
    return _own_client(cfg, client_id, train, test, where=str(path))


def task_counts(samples: list[Sample]) -> dict[str, int]:
    """Samples per task, in order of first appearance."""
    return dict(Counter(s.task for s in samples))
