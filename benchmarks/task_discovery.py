"""Task discovery on many task mixes: which embedding and which clustering rules find tasks, not templates.

Embeddings and clustering only (no training, no Flower): for every split below, each client's training inputs are
clustered locally, the server clusters all clients' local centroids (weighted by their counts), and each client's
test inputs are routed. Labels only score. Reported per split and candidate: local and global clustering accuracy
(also "by dataset": the mixes hold gigaword, QQP and WebNLG twice, from paper4 and from flan16 in other templates,
scored there as one task each), local k per client, global k, how many global clusters the most-split task is
spread over, and routing accuracy (local and global mode). Candidates: the product's rules before issue 19 and its
default now (both through `fedrouter.discovery` with their settings), variations of the default's settings, the
default's global step on the true tasks (what the global step alone can do), and two other rules.

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

from fedrouter import bench, discovery
from fedrouter.algorithm.clustering import cluster_means, local_clusters, nearest
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
    settings = bench.run_settings(bench.PROFILES["paper4-cpu"], scenario, "fedrouter", seed, DATA)
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
    """Cached embeddings looked up by text: ``get(texts, "mean-30")``; ``"mean-6:reference"`` divides by the
    product's reference scale for that layer (`discovery.embedding_space`, computed here once per layer)."""

    layers = 30  # SmolLM2-135M's hidden layers: embed_depth d is layer round(30 d)

    def __init__(self, precision: str = "auto") -> None:
        self.arrays = embedding_cache.load(precision)
        self.row = {k: i for i, k in enumerate(self.arrays["keys"].tolist())}
        self.precision = precision
        self.scales: dict[int, np.ndarray] = {}

    def get(self, texts: list[str], name: str) -> np.ndarray:
        if "+" in name:  # a concatenation of unit-length parts
            return np.concatenate([unit(self.get(texts, part)) for part in name.split("+")], axis=1)
        name, _, scale = name.partition(":")
        rows = [self.row[embedding_cache.key(t)] for t in texts]
        x = self.arrays[name][rows].astype(np.float64)
        return x / self.scale(int(name.split("-")[1])) if scale == "reference" else x

    def scale(self, layer: int) -> np.ndarray:
        if layer not in self.scales:
            base = embedding_cache.base_model(self.precision)
            space = discovery.embedding_space(base, layer / self.layers, "reference")
            assert space.layer == layer, (space.layer, layer)
            self.scales[layer] = space.scale.astype(np.float64)
        return self.scales[layer]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Candidate:
    """An embedding and the two clustering rules.

    ``local(x, seed)`` -> (labels, local routing function x -> local cluster), or "oracle" (the true tasks);
    ``global_(centroids, counts, spreads, seed)`` -> (labels, global routing function x -> global cluster).
    """

    name: str
    embedding: str
    local: Callable
    global_: Callable


SAME_DATASET = {
    "flan16/gigaword": "gigaword",
    "paper4/gigaword": "gigaword",
    "flan16/glue_qqp": "qqp",
    "paper4/qqp": "qqp",
    "flan16/web_nlg_en": "webnlg",
    "paper4/webnlg": "webnlg",
}


def _nearest_mean(x: np.ndarray, labels: np.ndarray) -> Callable:
    means = cluster_means(x, labels)
    return lambda q: nearest(q, means)


def evaluate(split: Split, cand: Candidate, emb: Embeddings) -> dict:
    tasks = split.tasks
    centroids, counts, spreads, offsets, local_routes, local_acc = [], [], [], [], [], 0
    local_k, sample_local = [], []
    for client in split.clients:
        x = emb.get(client.train, cand.embedding)
        if cand.local == "oracle":  # the true tasks as local clusters: what the global step alone can do
            held = sorted(set(client.train_tasks))
            labels = np.array([held.index(t) for t in client.train_tasks])
            router = _nearest_mean(x, labels)
        else:
            labels, router = cand.local(x, split.seed)
        k = int(labels.max()) + 1
        local_k.append(k)
        local_acc += clustering_accuracy(contingency(labels, client.train_tasks, k, tasks)) * len(x)
        offsets.append(len(centroids))  # this client's first local cluster among all uploaded ones
        centroids += list(cluster_means(x, labels))
        counts += np.bincount(labels, minlength=k).tolist()
        spreads += discovery.cluster_spreads(x, labels, k).tolist()
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
    # The mixes hold three datasets under two task names each (one dataset, two templates): scored as one task.
    datasets = [SAME_DATASET.get(t, t) for t in all_tasks]
    by_dataset = contingency(sample_global, datasets, gk, sorted(set(datasets)))
    return {
        "split": split.name,
        "group": split.group,
        "seed": split.seed,
        "candidate": cand.name,
        "tasks": len(tasks),
        "cluster_acc_local": round(local_acc / len(all_tasks), 4),
        "cluster_acc_global": round(clustering_accuracy(table), 4),
        "cluster_acc_global_by_dataset": round(clustering_accuracy(by_dataset), 4),
        "local_k": local_k,
        "global_k": gk,
        "max_clusters_per_task": spread_over,
        "routing_acc_local": round(routing_accuracy(routed["local"], table), 4),
        "routing_acc_global": round(routing_accuracy(routed["global"], table), 4),
    }


# --- rules: the product's, from its settings (through `fedrouter.discovery`), then other candidates ---

# The product's default before issue 19 (last layer, raw embeddings, silhouette K-Means local and global).
BEFORE = {
    "cluster.embed_depth": 1.0,
    "cluster.embed_scale": "none",
    "cluster.local_space": "raw",
    "cluster.local_threshold": 0.2,
    "cluster.global_method": "silhouette",
}


def product(name: str, settings: dict, emb: Embeddings) -> Candidate:
    """The product's own embedding space and clustering for these ``cluster.*`` settings (others at defaults)."""

    def config(seed: int) -> Config:
        return Config(settings | {"run.seed": seed}, where=name)

    cfg = config(0)
    layer = round(cfg["cluster.embed_depth"] * emb.layers)
    embedding = f"mean-{layer}" + (":reference" if cfg["cluster.embed_scale"] == "reference" else "")

    def local(x: np.ndarray, seed: int):
        fitted = discovery.cluster_samples(config(seed), x)
        return fitted.labels_, fitted.predict

    def global_(c: np.ndarray, w: np.ndarray, s: np.ndarray, seed: int):
        fitted = discovery.cluster_centroids(config(seed), c, w, s)
        return fitted.labels_, fitted.predict

    return Candidate(name, embedding, local, global_)


def sil_local(threshold: float = 0.2, k_max: int = 6, space: str = "raw") -> Callable:
    """Silhouette K-Means per client on raw, unit-length or client-centred unit-length embeddings."""

    def fit(x: np.ndarray, seed: int):
        mean = x.mean(0)
        z = _space(x, space, mean)
        fitted = local_clusters(z, k="auto", k_max=k_max, threshold=threshold, seed=seed)
        centers = cluster_means(z, fitted.labels_)
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


def _router(c, w, labels, space, center):
    means = cluster_means(c, labels, w)
    if space == "raw" or space == "unit":
        return lambda q: nearest(q, means)
    targets = _space(means, space, center)
    return lambda q: nearest(_space(q, space, center), targets)


def spread_agglomerative(threshold: float) -> Callable:
    """Agglomerative clustering of the local centroids on Euclidean distance / the pair's pooled spread."""

    def fit(c: np.ndarray, w: np.ndarray, s: np.ndarray, seed: int):
        if len(c) == 1:
            return np.zeros(1, dtype=int), _router(c, w, np.zeros(1, int), "raw", None)
        d = np.linalg.norm(c[:, None] - c[None], axis=-1) / np.sqrt((s[:, None] ** 2 + s[None] ** 2) / 2)
        np.fill_diagonal(d, 0)
        model = AgglomerativeClustering(
            n_clusters=None, distance_threshold=threshold, metric="precomputed", linkage="average"
        )
        labels = model.fit_predict(d)
        return labels, _router(c, w, labels, "raw", None)

    return fit


def candidates(emb: Embeddings) -> list[Candidate]:
    """The product's default before and now, variations of today's settings, then other rules measured beside."""
    return [
        product("before: mean-30, silhouette k-means, cosine global (k<=16)", BEFORE, emb),
        product("default: mean-6 / reference scale, centred local (0.11), agglomerative global (0.4)", {}, emb),
        Candidate(
            "default's global step on the true tasks as local clusters (oracle local)",
            "mean-6:reference",
            "oracle",
            product("", {}, emb).global_,
        ),
        product("default, local threshold 0.10", {"cluster.local_threshold": 0.1}, emb),
        product("default, global threshold 0.3", {"cluster.global_threshold": 0.3}, emb),
        product("default, global threshold 0.5", {"cluster.global_threshold": 0.5}, emb),
        product("default without the reference scale (mean-6 raw)", {"cluster.embed_scale": "none"}, emb),
        product("default at depth 1.0 (mean-30 / reference scale)", {"cluster.embed_depth": 1.0}, emb),
        product("default at depth 0.4 (mean-12 / reference scale)", {"cluster.embed_depth": 0.4}, emb),
        Candidate(
            "last-30, client-centred local, spread-normalised agglomerative global (0.8)",
            "last-30",
            sil_local(space="centered", threshold=0.1),
            spread_agglomerative(0.8),
        ),
        Candidate(
            "mean-20+last-20, client-centred local, spread-normalised agglomerative global (0.8)",
            "mean-20+last-20",
            sil_local(space="centered", threshold=0.1),
            spread_agglomerative(0.8),
        ),
    ]


def summary(rows: list[dict]) -> list[str]:
    lines = [
        "| candidate | split | seeds | global acc. (min–max) | by dataset (min–max) | local acc. (min) | global k "
        "| tasks | max clusters per task | routing acc. local / global (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cand in dict.fromkeys(r["candidate"] for r in rows):
        for name in dict.fromkeys(r["split"] for r in rows):
            rs = [r for r in rows if r["candidate"] == cand and r["split"] == name]
            g = [r["cluster_acc_global"] for r in rs]
            d = [r["cluster_acc_global_by_dataset"] for r in rs]
            lines.append(
                f"| {cand} | {name} | {len(rs)} | {min(g):.3f}–{max(g):.3f} | {min(d):.3f}–{max(d):.3f} "
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
    for cand in candidates(emb):
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
