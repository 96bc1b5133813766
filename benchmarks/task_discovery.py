"""Task discovery on many task mixes: which embedding and which clustering rules find tasks, not templates.

Embeddings and clustering only (no training, no Flower): for every split below, each client's training inputs are
clustered locally, the server clusters all clients' local centroids (weighted by their counts), and each client's
test inputs are routed. Labels only score. Reported per split and candidate: local and global clustering accuracy,
local k per client, global k, how many global clusters the most-split task is spread over, and routing accuracy
(local and global mode).

Splits (train 96 samples per client unless said; personalized test sets, 8 samples per task held):
- the six paper4 splits of `fedrouter bench` (single, dual, all; seeds 0, 1), and paper4-raw's (seed 0, 1, 2);
- flan16-dual (16 clients holding two of 16 FLAN tasks each, 48 samples per client; seeds 0, 1, 2);
- mix24-x2: the 24 tasks of paper4 + extra + flan16, 16 clients holding 3 tasks each (every task on 2 clients);
- mix24-x1: the same 24 tasks, 8 clients holding 3 each (every task on one client);
- extra-dual: extra's 4 tasks (sst2, ag_news, xsum, wmt), 8 clients holding two each.

Embeddings come from `benchmarks/embedding_cache.py` (run it first; ~16 min here), every layer of ``LAYERS`` there.

    .venv/bin/python benchmarks/embedding_cache.py
    .venv/bin/python benchmarks/task_discovery.py          # writes benchmarks/results/task-discovery.json + .md
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import embedding_cache
from sklearn.cluster import AgglomerativeClustering

from fedrouter import bench
from fedrouter.algorithm.clustering import SilhouetteKMeans, global_clusters, local_clusters, nearest
from fedrouter.algorithm.metrics import clustering_accuracy, contingency, routing_accuracy
from fedrouter.config import Config
from fedrouter.data import all_clients
from fedrouter.data.samples import load_file

ROOT = Path(__file__).resolve().parents[1]
DATA = embedding_cache.DATA
OUT = ROOT / "benchmarks" / "results"


@dataclass
class Client:
    train: list[str]
    train_tasks: list[str]
    test: list[str]
    test_tasks: list[str]


@dataclass
class Split:
    name: str
    group: str  # paper4, paper4-raw, flan16, mix
    seed: int
    clients: list[Client]

    @property
    def tasks(self) -> list[str]:
        return sorted({t for c in self.clients for t in c.train_tasks})


def bench_split(scenario: str, seed: int, source: str) -> Split:
    settings = bench.run_settings(bench.PROFILES["full"], scenario, "fedrouter", seed, DATA)
    settings |= {"eval.sets": "personalized", "data.test_per_task": 8, "data.test_per_task_overrides": ""}
    if source != "flan16":
        settings["data.source"] = str(DATA / source)
    clients = [
        Client(
            [s.instruction for s in c.train],
            [s.task for s in c.train],
            [s.instruction for s in c.tests["personalized"]],
            [s.task for s in c.tests["personalized"]],
        )
        for c in all_clients(Config(settings, where="task-discovery"))
    ]
    group = "flan16" if source == "flan16" else source
    return Split(f"{source}-{scenario}" if source != "flan16" else "flan16-dual", group, seed, clients)


def pools(sources: tuple[str, ...], split: str) -> dict[str, list]:
    """Samples by task, task names prefixed by their source where two sources share one (gigaword)."""
    names: dict[str, list] = {}
    for source in sources:
        for sample in load_file(DATA / source / f"{split}.jsonl"):
            names.setdefault(f"{source}/{sample.task}", []).append(sample)
    return names


def dealt_split(name: str, seed: int, sources: tuple[str, ...], held: Callable[[list[str]], list[list[str]]]) -> Split:
    """Clients holding the tasks ``held`` gives them (from the seed-shuffled task list), 96 samples each."""
    train, test = pools(sources, "train"), pools(sources, "test")
    rng = random.Random(seed)
    tasks = sorted(train)
    rng.shuffle(tasks)
    for pool in (*train.values(), *test.values()):
        rng.shuffle(pool)
    cursor = dict.fromkeys(tasks, 0)
    clients = []
    for own in held(tasks):
        per = 96 // len(own)
        tr = [s for t in own for s in train[t][cursor[t] : cursor[t] + per]]
        for t in own:
            cursor[t] += per
        te = [(s, t) for t in own for s in test[t][len(clients) * 8 % len(test[t]) :][:8]]
        clients.append(
            Client(
                [s.instruction for s in tr],
                [t for t in own for _ in range(per)],
                [s.instruction for s, _ in te],
                [t for _, t in te],
            )
        )
    return Split(name, "mix", seed, clients)


def splits() -> list[Split]:
    out = [bench_split(s, seed, "paper4") for s in ("single", "dual", "all") for seed in (0, 1)]
    out += [bench_split(s, seed, "paper4-raw") for s in ("single", "dual", "all") for seed in (0, 1, 2)]
    out += [bench_split("flan16-dual", seed, "flan16") for seed in (0, 1, 2)]
    all24 = ("paper4", "extra", "flan16")
    for seed in (0, 1, 2):
        out.append(
            dealt_split("mix24-x2", seed, all24, lambda t: [[t[(3 * i + j) % 24] for j in range(3)] for i in range(16)])
        )
        out.append(dealt_split("mix24-x1", seed, all24, lambda t: [t[3 * i : 3 * i + 3] for i in range(8)]))
        out.append(
            dealt_split("extra-dual", seed, ("extra",), lambda t: [[t[i % 4], t[(i + 1) % 4]] for i in range(8)])
        )
    return out


class Embeddings:
    """Cached embeddings looked up by text: ``get(texts, "mean-30")``."""

    def __init__(self, precision: str = "auto") -> None:
        self.arrays = embedding_cache.load(precision)
        self.row = {k: i for i, k in enumerate(self.arrays["keys"].tolist())}

    def get(self, texts: list[str], name: str) -> np.ndarray:
        if "+" in name:  # a concatenation of unit-length parts
            return np.concatenate([unit(self.get(texts, part)) for part in name.split("+")], axis=1)
        rows = [self.row[embedding_cache.key(t)] for t in texts]
        return self.arrays[name][rows].astype(np.float64)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Candidate:
    """An embedding and the two clustering rules.

    ``local(x, seed)`` -> (labels, local routing function x -> local cluster);
    ``global_(centroids, counts, spreads, seed)`` -> (labels, global routing function x -> global cluster).
    """

    name: str
    embedding: str
    local: Callable
    global_: Callable


def evaluate(split: Split, cand: Candidate, emb: Embeddings) -> dict:
    tasks = split.tasks
    centroids, counts, spreads, offsets, local_routes, local_acc = [], [], [], [], [], 0
    local_k, sample_local = [], []
    for client in split.clients:
        x = emb.get(client.train, cand.embedding)
        labels, router = cand.local(x, split.seed)
        k = int(labels.max()) + 1
        local_k.append(k)
        local_acc += clustering_accuracy(contingency(labels, client.train_tasks, k, tasks)) * len(x)
        offsets.append(len(centroids))  # this client's first local cluster among all uploaded ones
        for j in range(k):
            members = x[labels == j]
            centroids.append(members.mean(0))
            counts.append(len(members))
            spreads.append(float(np.sqrt(((members - members.mean(0)) ** 2).sum(1).mean())))
        sample_local.append(labels + offsets[-1])
        local_routes.append(router)
    centroids, counts = np.array(centroids), np.array(counts, float)
    glabels, grouter = cand.global_(centroids, counts, np.array(spreads), split.seed)
    gk = int(glabels.max()) + 1
    sample_global = np.concatenate([glabels[s] for s in sample_local])
    all_tasks = [t for c in split.clients for t in c.train_tasks]
    table = contingency(sample_global, all_tasks, gk, tasks)
    # How many global clusters hold at least 10% of a task's training samples.
    spread_over = int(((table / table.sum(0, keepdims=True)) >= 0.1).sum(0).max())
    routed = {"local": np.zeros_like(table), "global": np.zeros_like(table)}
    for i, client in enumerate(split.clients):
        x = emb.get(client.test, cand.embedding)
        for mode, g in (("local", glabels[local_routes[i](x) + offsets[i]]), ("global", grouter(x))):
            for cluster, task in zip(g, client.test_tasks, strict=True):
                routed[mode][cluster, tasks.index(task)] += 1
    return {
        "split": split.name,
        "group": split.group,
        "seed": split.seed,
        "candidate": cand.name,
        "tasks": len(tasks),
        "cluster_acc_local": round(local_acc / len(all_tasks), 4),
        "cluster_acc_global": round(clustering_accuracy(table), 4),
        "local_k": local_k,
        "global_k": gk,
        "max_clusters_per_task": spread_over,
        "routing_acc_local": round(routing_accuracy(routed["local"], table), 4),
        "routing_acc_global": round(routing_accuracy(routed["global"], table), 4),
    }


# --- rules: today's default through the product's own functions and settings, then the candidates ---


def default_local(x: np.ndarray, seed: int):
    """The product's local clustering (`local_clusters` with the `cluster.*` defaults), Euclidean routing."""
    cfg = Config({"run.seed": seed})
    fitted = local_clusters(
        x,
        k=cfg.cluster_k("cluster.local_k"),
        k_max=cfg["cluster.local_k_max"],
        threshold=cfg["cluster.silhouette_threshold"],
        seed=seed,
    )
    return fitted.labels_, fitted.predict


def default_global(c: np.ndarray, w: np.ndarray, s: np.ndarray, seed: int):
    """The product's global clustering (`global_clusters` with the `cluster.*` defaults), Euclidean routing."""
    cfg = Config({"run.seed": seed})
    fitted = global_clusters(
        c,
        w,
        k=cfg.cluster_k("cluster.global_k"),
        k_max=cfg["cluster.global_k_max"],
        threshold=cfg["cluster.silhouette_threshold"],
        seed=seed,
        metric=cfg["cluster.global_metric"],
    )
    return fitted.labels_, fitted.predict


def sil_local(threshold: float = 0.2, k_max: int = 6, space: str = "raw") -> Callable:
    """Silhouette K-Means per client on raw, unit-length or client-centred unit-length embeddings."""

    def fit(x: np.ndarray, seed: int):
        mean = x.mean(0)
        z = _space(x, space, mean)
        fitted = local_clusters(z, k="auto", k_max=k_max, threshold=threshold, seed=seed)
        centers = np.stack([z[fitted.labels_ == j].mean(0) for j in range(fitted.n_clusters_)])
        return fitted.labels_, lambda q: nearest(_space(q, space, mean), centers)

    return fit


def _space(x: np.ndarray, space: str, center: np.ndarray) -> np.ndarray:
    if space == "raw":
        return x
    if space == "unit":
        return unit(x)
    if space == "centered":
        return unit(x - center)
    raise ValueError(space)


def sil_global(k_max: int | None = 16, space: str = "unit", threshold: float = 0.2) -> Callable:
    """Silhouette K-Means over the local centroids' directions (optionally centred on their weighted mean)."""

    def fit(c: np.ndarray, w: np.ndarray, s: np.ndarray, seed: int):
        center = np.average(c, axis=0, weights=w)
        z = _space(c, space, center)
        top = len(c) - 1 if k_max is None else k_max
        fitted = SilhouetteKMeans(k="auto", k_max=top, threshold=threshold, random_state=seed).fit(z, sample_weight=w)
        return fitted.labels_, _router(c, w, fitted.labels_, space, center)

    return fit


def _router(c, w, labels, space, center):
    k = int(labels.max()) + 1
    means = np.stack([np.average(c[labels == g], axis=0, weights=w[labels == g]) for g in range(k)])
    if space == "raw" or space == "unit":  # today's router: nearest global centroid, Euclidean
        return lambda q: nearest(q, means)
    targets = _space(means, space, center)
    return lambda q: nearest(_space(q, space, center), targets)


def agglo_global(threshold: float, space: str = "centered", linkage: str = "average", spread: bool = False) -> Callable:
    """Agglomerative clustering of the local centroids cut at a distance threshold (no k to choose).

    ``spread``: Euclidean distance divided by the pair's pooled spread (RMS radius of the two local clusters),
    otherwise cosine distance in ``space``.
    """

    def fit(c: np.ndarray, w: np.ndarray, s: np.ndarray, seed: int):
        center = np.average(c, axis=0, weights=w)
        if len(c) == 1:
            return np.zeros(1, dtype=int), _router(c, w, np.zeros(1, int), space, center)
        if spread:
            d = np.linalg.norm(c[:, None] - c[None], axis=-1) / np.sqrt((s[:, None] ** 2 + s[None] ** 2) / 2)
        else:
            z = _space(c, space, center)
            d = np.clip(1 - z @ z.T, 0, 2)
        np.fill_diagonal(d, 0)
        model = AgglomerativeClustering(
            n_clusters=None, distance_threshold=threshold, metric="precomputed", linkage=linkage
        )
        labels = model.fit_predict(d)
        return labels, _router(c, w, labels, space if not spread else "raw", center)

    return fit


def candidates() -> list[Candidate]:
    """Today's default first (the product's rules and settings), then the candidates measured beside it."""
    return [
        Candidate(
            "today: mean-30, silhouette k-means, cosine global (k<=16)", "mean-30", default_local, default_global
        ),
        Candidate(
            "mean-30, client-centred local, centred global silhouette (k<=n-1), t=0.1",
            "mean-30",
            sil_local(space="centered", threshold=0.1),
            sil_global(k_max=None, space="centered", threshold=0.1),
        ),
        Candidate(
            "last-30, client-centred local, spread-normalised agglomerative global (0.8)",
            "last-30",
            sil_local(space="centered", threshold=0.1),
            agglo_global(0.8, spread=True),
        ),
        Candidate(
            "mean-20+last-20, client-centred local, spread-normalised agglomerative global (0.8)",
            "mean-20+last-20",
            sil_local(space="centered", threshold=0.1),
            agglo_global(0.8, spread=True),
        ),
    ]


def summary(rows: list[dict]) -> list[str]:
    lines = [
        "| candidate | split | seeds | global acc. (min–max) | local acc. (min) | global k | tasks "
        "| max clusters per task | routing acc. local / global (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cand in dict.fromkeys(r["candidate"] for r in rows):
        for name in dict.fromkeys(r["split"] for r in rows):
            rs = [r for r in rows if r["candidate"] == cand and r["split"] == name]
            g = [r["cluster_acc_global"] for r in rs]
            lines.append(
                f"| {cand} | {name} | {len(rs)} | {min(g):.3f}–{max(g):.3f} "
                f"| {min(r['cluster_acc_local'] for r in rs):.3f} | {', '.join(str(r['global_k']) for r in rs)} "
                f"| {rs[0]['tasks']} | {max(r['max_clusters_per_task'] for r in rs)} "
                f"| {min(r['routing_acc_local'] for r in rs):.3f} / {min(r['routing_acc_global'] for r in rs):.3f} |"
            )
    return lines


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    emb = Embeddings()
    every_split = splits()
    rows = []
    for cand in candidates():
        for split in every_split:
            rows.append(evaluate(split, cand, emb))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "command": "python benchmarks/embedding_cache.py && python benchmarks/task_discovery.py",
        "commit": bench.commit(),
        "machine": bench.machine(),
        "embedding_precision": "auto",  # bf16 where the machine has AVX-512 BF16 (see "machine"), else fp32
    }
    (OUT / "task-discovery.json").write_text(json.dumps(meta | {"runs": rows}, indent=1) + "\n")
    text = "\n".join(["# Task discovery (embeddings and clustering only)", "", f"`{meta['command']}`", ""])
    (OUT / "task-discovery.md").write_text(text + "\n".join(summary(rows)) + "\n")
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
