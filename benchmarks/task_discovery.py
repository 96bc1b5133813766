"""Task discovery on many task mixes: which embedding and which clustering rules find tasks, not templates.

Embeddings and clustering only (no training, no Flower): for every split below, each client's training inputs are
clustered locally, the server clusters all clients' local centroids (weighted by their counts), and each client's
test inputs are routed. Labels only score. Reported per split and candidate: local and global clustering accuracy
(also "by dataset": the mixes hold gigaword, QQP and WebNLG twice, from paper4 and from flan16 in other templates,
scored there as one task each), local k per client, global k, how many global clusters the most-split task is
spread over, and routing accuracy (local and global mode). Candidates: the product's rules before issue 19, after
its first part (4893e4b) and its default now, all through `fedrouter.discovery.discover` with their settings (the
functions a federated run calls), variations of the default's settings, the default's global step on the true
tasks (what the global step alone can do), and two other rules.

Splits (train 96 samples per client unless said; personalized test sets, 8 samples per task held):
- the six paper4 splits of `fedrouter bench` (single, dual, all; seeds 0, 1), and paper4-raw's (seed 0, 1, 2);
- flan16-dual (16 clients holding two of 16 FLAN tasks each, 48 samples per client; seeds 0, 1, 2);
- mix24-x2: the 24 tasks of paper4 + extra + flan16, 16 clients holding 3 tasks each (every task on 2 clients);
- mix24-x1: the same 24 tasks, 8 clients holding 3 each (every task on one client);
- extra-dual: extra's 4 tasks (sst2, ag_news, xsum, wmt), 8 clients holding two each.

Embeddings come from `benchmarks/embedding_cache.py` (run it first; ~30 min here): the raw-text poolings and the
product's prompt poolings, unscaled; this script divides them by the product's reference scales.

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
from itertools import pairwise
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import embedding_cache
from sklearn.cluster import AgglomerativeClustering

from fedrouter import bench, discovery
from fedrouter.algorithm.clustering import FittedCentres, cluster_means, local_clusters, nearest
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
    """Cached embeddings looked up by text.

    ``get(texts, "mean-30")``: a raw-text pooling; ``"mean-6:reference"`` divides it by the product's reference
    scale for that layer. ``get(texts, "prompt-6-0+prompt-18-32")``: the product's prompt embedding with those
    (layer, edge) parts, each divided by its prompt reference scale and made unit length, concatenated (what
    `discovery.EmbeddingSpace.embed` computes). ``space(settings)`` names the embedding of ``cluster.*`` settings.
    """

    layers = 30  # SmolLM2-135M's hidden layers: depth d is layer round(30 d), as compute.embedding_layer

    def __init__(self, precision: str = "auto") -> None:
        self.arrays = embedding_cache.load(precision)
        prompt = embedding_cache.load(precision, "prompt")
        if prompt["keys"].tolist() != self.arrays["keys"].tolist():
            order = {k: i for i, k in enumerate(prompt["keys"].tolist())}
            rows = [order[k] for k in self.arrays["keys"].tolist()]
            prompt = {name: values[rows] for name, values in prompt.items()}
        self.arrays |= {name: values for name, values in prompt.items() if name != "keys"}
        self.row = {k: i for i, k in enumerate(self.arrays["keys"].tolist())}
        self.precision = precision
        self.scales: dict[str, np.ndarray] = {}

    def get(self, texts: list[str], name: str) -> np.ndarray:
        if name.startswith("prompt-") and ":" not in name:
            parts = [self.get(texts, f"{part}:reference") for part in name.split("+")]
            return np.concatenate([unit(part) for part in parts], axis=1)
        if "+" in name:  # a concatenation of unit-length parts
            return np.concatenate([unit(self.get(texts, part)) for part in name.split("+")], axis=1)
        name, _, scale = name.partition(":")
        rows = [self.row[embedding_cache.key(t)] for t in texts]
        x = self.arrays[name][rows].astype(np.float64)
        return x / self.scale(name) if scale == "reference" else x

    def space(self, settings: discovery.EmbeddingSettings) -> str:
        layer = round(settings.depth * self.layers)
        if settings.kind == "text":
            return f"mean-{layer}" + (":reference" if settings.scale == "reference" else "")
        assert settings.scale == "reference", "the cache's prompt candidates are all scaled"
        return f"prompt-{layer}-0+prompt-{round(settings.edge_depth * self.layers)}-{settings.edge_tokens}"

    def scale(self, name: str) -> np.ndarray:
        """The product's reference scale of a cached pooling (``mean-<layer>`` or ``prompt-<layer>-<edge>``)."""
        if name not in self.scales:
            from fedrouter.model import compute

            base = embedding_cache.base_model(self.precision)
            if name.startswith("prompt-"):
                _, layer, edge = name.split("-")
                (scale,) = compute.prompt_reference_scales(base, [(int(layer), int(edge))])
            else:
                space = discovery.embedding_space(
                    base, discovery.EmbeddingSettings("text", int(name.split("-")[1]) / self.layers, "reference")
                )
                scale = space.scales[0]
            self.scales[name] = scale.astype(np.float64)
        return self.scales[name]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Candidate:
    """An embedding and a two-level clustering rule: ``fit(xs, seed)`` -> `discovery.Discovery` for the clients'
    training embeddings ``xs`` (the product's own `discovery.discover`, or another rule in the same shape)."""

    name: str
    embedding: str
    fit: Callable


SAME_DATASET = {
    "flan16/gigaword": "gigaword",
    "paper4/gigaword": "gigaword",
    "flan16/glue_qqp": "qqp",
    "paper4/qqp": "qqp",
    "flan16/web_nlg_en": "webnlg",
    "paper4/webnlg": "webnlg",
}
# One task in two templates (paraphrase detection on QQP; WebNLG triples to text). Gigaword is two tasks: paper4
# writes a headline for an article, flan16 a sentence for a headline.
SAME_TASK = {k: v for k, v in SAME_DATASET.items() if v != "gigaword"}


def evaluate(split: Split, cand: Candidate, emb: Embeddings) -> dict:
    tasks = split.tasks
    xs = [emb.get(client.train, cand.embedding) for client in split.clients]
    found = cand.fit(xs, split.seed, split)
    local_k = [int(lab.max()) + 1 for lab in found.local_labels]
    local_acc = sum(
        clustering_accuracy(contingency(lab, client.train_tasks, k, tasks)) * len(lab)
        for lab, client, k in zip(found.local_labels, split.clients, local_k, strict=True)
    )
    gk = found.global_fit.n_clusters_
    sample_global = np.concatenate([found.sample_clusters(i) for i in range(len(split.clients))])
    all_tasks = [t for c in split.clients for t in c.train_tasks]
    table = contingency(sample_global, all_tasks, gk, tasks)
    # How many global clusters hold at least 10% of a task's training samples.
    spread_over = int(((table / table.sum(0, keepdims=True)) >= 0.1).sum(0).max())
    routed = {"local": np.zeros_like(table), "global": np.zeros_like(table)}
    for i, client in enumerate(split.clients):
        x = emb.get(client.test, cand.embedding)
        local = found.assignment[i][nearest(x, found.local_centroids[i])]
        for mode, g in (("local", local), ("global", found.global_fit.predict(x))):
            for cluster, task in zip(g, client.test_tasks, strict=True):
                routed[mode][cluster, tasks.index(task)] += 1

    def merged(names: dict) -> float:
        labels = [names.get(t, t) for t in all_tasks]
        return round(clustering_accuracy(contingency(sample_global, labels, gk, sorted(set(labels)))), 4)

    return {
        "split": split.name,
        "group": split.group,
        "seed": split.seed,
        "candidate": cand.name,
        "tasks": len(tasks),
        "cluster_acc_local": round(local_acc / len(all_tasks), 4),
        "cluster_acc_global": round(clustering_accuracy(table), 4),
        "cluster_acc_global_by_task": merged(SAME_TASK),
        "cluster_acc_global_by_dataset": merged(SAME_DATASET),
        "local_k": local_k,
        "local_k_before_refinement": found.local_k_first,
        "global_k": gk,
        "max_clusters_per_task": spread_over,
        "routing_acc_local": round(routing_accuracy(routed["local"], table), 4),
        "routing_acc_global": round(routing_accuracy(routed["global"], table), 4),
    }


# --- rules: the product's, from its settings (through `fedrouter.discovery`), then other candidates ---

# The product's default before issue 19 (last layer, raw embeddings, silhouette K-Means local and global).
BEFORE = {
    "cluster.embedding": "text",
    "cluster.embed_depth": 1.0,
    "cluster.embed_scale": "none",
    "cluster.local_space": "raw",
    "cluster.local_threshold": 0.2,
    "cluster.global_method": "silhouette",
    "cluster.refine_rounds": 0,
}
# Issue 19's first default (4893e4b): layer-6 text mean / reference scale, centred local search, agglomerative global.
FIRST = {"cluster.embedding": "text", "cluster.refine_rounds": 0}


def product(name: str, settings: dict, emb: Embeddings) -> Candidate:
    """The product's own embedding and two-level clustering (`discovery.discover`) for these ``cluster.*``
    settings (the others at their defaults)."""

    def config(seed: int) -> Config:
        return Config(settings | {"run.seed": seed}, where=name)

    def fit(xs: list[np.ndarray], seed: int, split: Split) -> discovery.Discovery:
        return discovery.discover(config(seed), xs)

    return Candidate(name, emb.space(discovery.EmbeddingSettings.of(config(0))), fit)


def oracle_local(name: str, settings: dict, emb: Embeddings) -> Candidate:
    """The product's global step (no refinement) on the true tasks as local clusters: what it alone can do."""
    cfg = Config(settings | {"cluster.refine_rounds": 0}, where=name)

    def fit(xs: list[np.ndarray], seed: int, split: Split) -> discovery.Discovery:
        labels = []
        for client in split.clients:
            held = sorted(set(client.train_tasks))
            labels.append(np.array([held.index(t) for t in client.train_tasks]))
        return rule_discovery(xs, labels, lambda c, w, s: discovery.cluster_centroids(cfg, c, w, s))

    return Candidate(name, emb.space(discovery.EmbeddingSettings.of(cfg)), fit)


def rule_discovery(xs: list[np.ndarray], labels: list[np.ndarray], global_rule: Callable) -> discovery.Discovery:
    """A `discovery.Discovery` for given local labels and a global rule ``(centroids, counts, spreads) -> fit``."""
    centroids = [cluster_means(x, lab) for x, lab in zip(xs, labels, strict=True)]
    counts = [np.bincount(lab) for lab in labels]
    spreads = [discovery.cluster_spreads(x, lab, len(c)) for x, lab, c in zip(xs, labels, centroids, strict=True)]
    fitted = global_rule(np.concatenate(centroids), np.concatenate(counts).astype(float), np.concatenate(spreads))
    bounds = np.cumsum([0, *(len(c) for c in centroids)])
    assignment = [fitted.labels_[a:b] for a, b in pairwise(bounds)]
    return discovery.Discovery(labels, centroids, assignment, fitted, [len(c) for c in centroids])


class SpreadAgglomerative(FittedCentres):
    """Agglomerative clustering of the local centroids on Euclidean distance / the pair's pooled spread."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def fit(self, c: np.ndarray, w: np.ndarray, s: np.ndarray) -> SpreadAgglomerative:
        if len(c) == 1:
            self.labels_ = np.zeros(1, dtype=int)
        else:
            d = np.linalg.norm(c[:, None] - c[None], axis=-1) / np.sqrt((s[:, None] ** 2 + s[None] ** 2) / 2)
            np.fill_diagonal(d, 0)
            model = AgglomerativeClustering(
                n_clusters=None, distance_threshold=self.threshold, metric="precomputed", linkage="average"
            )
            self.labels_ = model.fit_predict(d)
        self.centers_ = cluster_means(c, self.labels_, w)
        return self


def centred_silhouette_spread(name: str, embedding: str, local_threshold: float, threshold: float) -> Candidate:
    """Silhouette K-Means per client on client-centred unit directions, spread-normalised agglomerative global."""

    def fit(xs: list[np.ndarray], seed: int, split: Split) -> discovery.Discovery:
        labels = []
        for x in xs:
            z = unit(x - x.mean(0))
            labels.append(local_clusters(z, k="auto", k_max=6, threshold=local_threshold, seed=seed).labels_)
        return rule_discovery(xs, labels, lambda c, w, s: SpreadAgglomerative(threshold).fit(c, w, s))

    return Candidate(name, embedding, fit)


DEFAULT = "default: prompt embedding (layer-6 mean + layer-18 edges, reference scales), centred local (0.11), "
DEFAULT += "agglomerative global (0.4), one refinement round (share 0.3)"


def candidates(emb: Embeddings) -> list[Candidate]:
    """The product's default before issue 19, after its first part and now; variations; other rules beside."""
    return [
        product("before issue 19: text mean-30, silhouette k-means, cosine global (k<=16)", BEFORE, emb),
        product("issue 19 first default (4893e4b): text mean-6 / reference, centred local, agglomerative", FIRST, emb),
        product(DEFAULT, {}, emb),
        oracle_local("default's global step on the true tasks as local clusters (oracle local)", {}, emb),
        product("default without refinement", {"cluster.refine_rounds": 0}, emb),
        product("4893e4b's text embedding with refinement", {"cluster.embedding": "text"}, emb),
        product("default, two refinement rounds", {"cluster.refine_rounds": 2}, emb),
        product("default, refinement share 0.2", {"cluster.refine_share": 0.2}, emb),
        product("default, local threshold 0.13", {"cluster.local_threshold": 0.13}, emb),
        product("default, global threshold 0.35", {"cluster.global_threshold": 0.35}, emb),
        product("default, global threshold 0.5", {"cluster.global_threshold": 0.5}, emb),
        product("default, edges at depth 0.5 (layer 15)", {"cluster.edge_depth": 0.5}, emb),
        product("default, edges at depth 0.7 (layer 21)", {"cluster.edge_depth": 0.7}, emb),
        product("default, 16 edge tokens", {"cluster.edge_tokens": 16}, emb),
        product("default, mean at depth 0.4 (layer 12)", {"cluster.embed_depth": 0.4}, emb),
        centred_silhouette_spread(
            "last-30, client-centred local, spread-normalised agglomerative global (0.8)", "last-30", 0.1, 0.8
        ),
        centred_silhouette_spread(
            "mean-20+last-20, client-centred local, spread-normalised agglomerative global (0.8)",
            "mean-20+last-20",
            0.1,
            0.8,
        ),
    ]


def summary(rows: list[dict]) -> list[str]:
    lines = [
        "| candidate | split | seeds | global acc. (min–max) | by task (min–max) | local acc. (min) | global k "
        "| tasks | max clusters per task | routing acc. local / global (min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cand in dict.fromkeys(r["candidate"] for r in rows):
        for name in dict.fromkeys(r["split"] for r in rows):
            rs = [r for r in rows if r["candidate"] == cand and r["split"] == name]
            g = [r["cluster_acc_global"] for r in rs]
            d = [r["cluster_acc_global_by_task"] for r in rs]
            lines.append(
                f"| {cand} | {name} | {len(rs)} | {min(g):.3f}–{max(g):.3f} | {min(d):.3f}–{max(d):.3f} "
                f"| {min(r['cluster_acc_local'] for r in rs):.3f} | {', '.join(str(r['global_k']) for r in rs)} "
                f"| {rs[0]['tasks']} | {max(r['max_clusters_per_task'] for r in rs)} "
                f"| {min(r['routing_acc_local'] for r in rs):.3f} / {min(r['routing_acc_global'] for r in rs):.3f} |"
            )
    return lines


def check_cache(emb: Embeddings) -> None:
    """The cached prompt embedding is the product's: `discovery.EmbeddingSpace.embed` on a few texts agrees."""
    base = embedding_cache.base_model(emb.precision)
    settings = discovery.EmbeddingSettings()
    texts = [s.instruction for s in load_file(DATA / "flan16" / "test.jsonl")[::400]]
    ours = discovery.embedding_space(base, settings).embed(base, texts)
    cached = emb.get(texts, emb.space(settings))
    cosine = (ours * cached).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(cached, axis=1)
    if cosine.min() < 0.999:  # bf16 rounding differs with the batch a text shares; anything more is a bug
        raise SystemExit(f"the cached prompt embeddings differ from the product's (cosine {cosine.min():.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the candidates whose name contains this text")
    parser.add_argument("--no-write", action="store_true", help="print the table, write no results")
    args = parser.parse_args()
    emb = Embeddings()
    check_cache(emb)
    every_split = splits()
    rows = []
    for cand in [c for c in candidates(emb) if args.only in c.name]:
        for split in every_split:
            rows.append(evaluate(split, cand, emb))
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "command": "python benchmarks/embedding_cache.py && python benchmarks/task_discovery.py",
        "commit": bench.commit(),
        "machine": bench.machine(),
        "embedding_precision": "auto",  # bf16 where the machine has AVX-512 BF16 (see "machine"), else fp32
    }
    if args.no_write:
        print("\n".join(summary(rows)))
        return
    (OUT / "task-discovery.json").write_text(json.dumps(meta | {"runs": rows}, indent=1) + "\n")
    text = "\n".join(["# Task discovery (embeddings and clustering only)", "", f"`{meta['command']}`", ""])
    (OUT / "task-discovery.md").write_text(text + "\n".join(summary(rows)) + "\n")
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
