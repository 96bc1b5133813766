"""Scenarios: how the tasks are spread over clients, and which test samples each client is scored on."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

from fedrouter.data.samples import DataError, Sample


@dataclass
class ClientData:
    """One client's private training samples and its test sets (keyed 'personalized' / 'generalization')."""

    client_id: int
    tasks: list[str]
    train: list[Sample]
    tests: dict[str, list[Sample]] = field(default_factory=dict)


def by_task(samples: list[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by task, tasks in order of first appearance (the order scenarios deal them in)."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[sample.task].append(sample)
    return dict(groups)


def client_tasks(scenario: str, client: int, tasks: list[str]) -> list[str]:
    """The tasks a client holds: single (one), dual (two neighbours), all / iid (every task)."""
    n = len(tasks)
    if scenario == "single":
        return [tasks[client % n]]
    if scenario == "dual":
        if n < 2:
            raise DataError(f"setting 'data.scenario' = 'dual' needs at least 2 tasks, the data has {n}")
        return [tasks[client % n], tasks[(client + 1) % n]]
    return list(tasks)


def _shares(total: int, parts: int) -> list[int]:
    """Split ``total`` into ``parts`` near-equal whole numbers (balanced)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def split_clients(
    train: list[Sample],
    test: list[Sample],
    *,
    num_clients: int,
    scenario: str,
    train_per_client: int,
    test_per_task: int,
    test_overrides: dict[str, int] | None = None,
    eval_sets: list[str] | tuple[str, ...] = ("personalized",),
    seed: int = 0,
) -> list[ClientData]:
    """Deal training samples to clients without overlap, and draw their test samples.

    Training samples of one task are shuffled once and handed out in consecutive slices, so no two clients
    share a training sample; asking for more than the source holds is an error, not a silent repeat.
    """
    train_pools = {task: list(pool) for task, pool in by_task(train).items()}
    test_pools = {task: list(pool) for task, pool in by_task(test).items()}
    tasks = list(train_pools)
    if not tasks:
        raise DataError("the training data is empty")
    rng = random.Random(seed)
    for pool in (*train_pools.values(), *test_pools.values()):
        rng.shuffle(pool)
    cursor = dict.fromkeys(tasks, 0)

    def take(task: str, count: int) -> list[Sample]:
        pool = train_pools[task]
        if cursor[task] + count > len(pool):
            raise DataError(
                f"settings 'data.num_clients' and 'data.train_per_client' ask for more '{task}' training "
                f"samples than the data holds ({len(pool)})"
            )
        chosen = pool[cursor[task] : cursor[task] + count]
        cursor[task] += count
        return chosen

    clients: list[ClientData] = []
    if scenario == "iid":
        mixed = [s for pool in train_pools.values() for s in pool]
        rng.shuffle(mixed)
        if num_clients * train_per_client > len(mixed):
            raise DataError(
                f"settings 'data.num_clients' x 'data.train_per_client' = {num_clients * train_per_client} "
                f"exceed the {len(mixed)} training samples"
            )
        for c in range(num_clients):
            own = mixed[c * train_per_client : (c + 1) * train_per_client]
            clients.append(ClientData(c, sorted({s.task for s in own}), own))
    else:
        for c in range(num_clients):
            held = client_tasks(scenario, c, tasks)
            own = [s for task, n in zip(held, _shares(train_per_client, len(held)), strict=True) for s in take(task, n)]
            clients.append(ClientData(c, held, own))

    overrides = test_overrides or {}
    every_task = tasks + [task for task in test_pools if task not in train_pools]  # some held out of training
    for client in clients:
        for name in eval_sets:
            test_tasks = client.tasks if name == "personalized" else every_task
            chosen: list[Sample] = []
            for task in test_tasks:
                pool = test_pools.get(task, [])
                if not pool:
                    raise DataError(f"the test data has no samples of task '{task}'")
                count = min(overrides.get(task, test_per_task), len(pool))
                start = (client.client_id * count) % len(pool)  # different clients, different samples
                chosen += [pool[(start + i) % len(pool)] for i in range(count)]
            client.tests[name] = chosen
    return clients


def dirichlet_shares(tasks: list[str], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Indices of each client's samples: per task, shares drawn from Dirichlet(alpha) (Flower Datasets'
    ``DirichletPartitioner``; small alpha, few tasks per client). Every client gets at least one sample."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    if num_clients > len(tasks):
        raise DataError(f"setting 'data.num_clients' = {num_clients} exceeds the {len(tasks)} training samples")
    rows = datasets.Dataset.from_dict({"task": tasks, "index": list(range(len(tasks)))})
    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="task", alpha=alpha, min_partition_size=1, seed=seed
    )
    partitioner.dataset = rows
    try:
        return [sorted(partitioner.load_partition(i)["index"]) for i in range(num_clients)]
    except ValueError as err:  # it gives up when a draw leaves a client below min_partition_size ten times
        raise DataError(f"setting 'data.dirichlet_alpha' = {alpha}: {err}") from None
