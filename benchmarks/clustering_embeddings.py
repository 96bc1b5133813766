"""Why FedRouter's clustering holds on paper4 and collapses on flan16: the embedding and the choice of k.

For the benchmark's data splits (paper4 `single`, `dual`, `all`, flan16 `flan16-dual`; seeds 0 and 1; the
settings of `fedrouter bench`), every client's training inputs are embedded twice with SmolLM2-135M:

- ``mean``: FedRouter's embedding (the mean of the last hidden layer over the input's tokens, `compute.embed`);
- ``last``: the last hidden layer at the input's last token (last-token pooling, common for decoder-only
  embedders), computed here for comparison only.

Then the product's own two-level clustering runs on them (`discovery.discover`, as the paper clusters: a silhouette
search per client in the raw space, K-Means on the server, threshold 0.2, no refinement) with three global settings: k chosen by the Euclidean silhouette
(the paper's, `cluster.global_metric = "euclidean"`), k chosen by the silhouette of the centroids' directions
(`"cosine"`, FedRouter's default since this measurement), and k fixed at the number of tasks (the authors' code
has only a fixed k). Also reported: 1-nearest-neighbour task accuracy (how well the embedding alone separates
tasks), the mean silhouette of the true task labels within each client, and whether a setting partitions the
training samples exactly as the Euclidean search does. No Flower, no training: embeddings and K-Means only.

    .venv/bin/python benchmarks/clustering_embeddings.py   # from the project root; 15 minutes here, alone

Writes benchmarks/results/clustering-embeddings.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, silhouette_score

from fedrouter import bench, discovery
from fedrouter.algorithm.metrics import clustering_accuracy, contingency
from fedrouter.config import Config
from fedrouter.data import all_clients
from fedrouter.model import compute
from fedrouter.model.compute import pad_rows
from fedrouter.model.loading import base_model
from fedrouter.model.prompts import embedding_ids

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SPLITS = [(scenario, seed) for scenario in ("single", "dual", "all", "flan16-dual") for seed in (0, 1)]
# How the server clusters the local centroids: (cluster.global_k, cluster.global_metric); the number of tasks
# stands in for "tasks" (the authors' fixed k). The first is the paper's search: the others' partitions are compared
# with it, so it must come first.
GLOBAL = (("auto", "euclidean"), ("auto", "cosine"), ("tasks", "euclidean"))


def last_token(base, texts: list[str], max_len: int, batch_size: int = 32) -> np.ndarray:
    """The last hidden layer at each input's last token (the same tokens as `compute.embed`)."""
    encoded = [embedding_ids(base.tokenizer, text, max_len) for text in texts]
    out = np.zeros((len(texts), base.hidden_size), dtype=np.float32)
    backbone = base.model.get_base_model().base_model
    with torch.no_grad(), base.model.disable_adapter(), base.autocast():
        for start in range(0, len(texts), batch_size):
            rows = encoded[start : start + batch_size]
            ids = pad_rows(rows, base.tokenizer.pad_token_id).to(base.device)
            mask = pad_rows([[1] * len(r) for r in rows], 0).to(base.device)
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            out[start : start + len(rows)] = hidden[torch.arange(len(rows)), mask.sum(1) - 1].cpu().numpy()
    return out


def nearest_neighbour_accuracy(x: np.ndarray, tasks: np.ndarray) -> float:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return float((tasks[similarity.argmax(1)] == tasks).mean())


# The clustering this analysis measured (the paper's, before issue 19): a silhouette search in the raw embedding
# space on each client, one silhouette threshold for clients and server, K-Means on the server, no refinement.
MEASURED = {
    "cluster.local_space": "raw",
    "cluster.local_threshold": 0.2,
    "cluster.silhouette_threshold": 0.2,
    "cluster.global_method": "silhouette",
    "cluster.refine_rounds": 0,
}


def pipeline(x: np.ndarray, tasks: np.ndarray, clients: np.ndarray, cfg: Config, global_k: str, metric: str) -> dict:
    """FedRouter's two-level clustering on precomputed embeddings, through the product's own `discovery.discover`
    (the functions a federated run's clients and server call) with the settings above."""
    names = sorted(set(tasks))
    owners = [np.where(clients == client)[0] for client in sorted(set(clients))]
    settings = dict(cfg) | MEASURED | {"cluster.global_k": global_k, "cluster.global_metric": metric}
    found = discovery.discover(Config(settings, where="analysis"), [x[rows] for rows in owners])
    local_k, matched = [], 0.0
    sample_clusters = np.zeros(len(x), dtype=int)
    for i, rows in enumerate(owners):
        labels = found.local_labels[i]
        k = int(labels.max()) + 1
        local_k.append(k)
        matched += clustering_accuracy(contingency(labels, tasks[rows], k, names)) * len(rows)
        sample_clusters[rows] = found.sample_clusters(i)
    fitted = found.global_fit
    merged = contingency(sample_clusters, tasks, fitted.n_clusters_, names)
    return {
        "sample_clusters": sample_clusters,  # dropped before writing: compared across settings
        "cluster_acc_local": round(matched / len(x), 4),
        "cluster_acc_global": round(clustering_accuracy(merged), 4),
        "local_k": local_k,
        "global_k": fitted.n_clusters_,
        "silhouette_global": {k: round(v, 4) for k, v in fitted.scores_.items()},
    }


def main() -> None:
    results = []
    for scenario, seed in SPLITS:
        cfg = Config(
            bench.run_settings(bench.PROFILES["paper4-cpu"], scenario, "fedrouter", seed, DATA), where="benchmark"
        )
        base = base_model(cfg)
        clients = all_clients(cfg)
        texts = [s.instruction for c in clients for s in c.train]
        tasks = np.array([s.task for c in clients for s in c.train])
        owners = np.array([c.client_id for c in clients for _ in c.train])
        started = time.time()
        embeddings = {
            "mean": compute.embed(base, texts, max_len=cfg["model.max_seq_len"]),
            "last": last_token(base, texts, cfg["model.max_seq_len"]),
        }
        for pooling, x in embeddings.items():
            mixed = [c for c in set(owners) if len(set(tasks[owners == c])) > 1]  # single-task clients have none
            true_silhouette = np.mean([silhouette_score(x[owners == c], tasks[owners == c]) for c in mixed] or np.nan)
            for global_k, metric in GLOBAL:
                global_k = str(len(set(tasks))) if global_k == "tasks" else global_k
                record = {
                    "scenario": scenario,
                    "seed": seed,
                    "pooling": pooling,
                    "global_k_setting": global_k,
                    "global_metric": metric,
                    "tasks": len(set(tasks)),
                    "nn_task_acc": round(nearest_neighbour_accuracy(x, tasks), 4),
                    "true_task_silhouette": None if np.isnan(true_silhouette) else round(float(true_silhouette), 4),
                } | pipeline(x, tasks, owners, cfg, global_k, metric)
                if (global_k, metric) == GLOBAL[0]:
                    euclidean = record["sample_clusters"]
                # Is the partition of the training samples the same as with the Euclidean search (up to names)?
                record["same_partition_as_euclidean"] = bool(
                    adjusted_rand_score(euclidean, record.pop("sample_clusters")) == 1.0
                )
                results.append(record)
                print(json.dumps(record), flush=True)
        print(f"{scenario}: embedded {len(texts)} inputs twice in {time.time() - started:.0f} s", flush=True)
    out = ROOT / "benchmarks" / "results" / "clustering-embeddings.json"
    meta = {
        "command": "python benchmarks/clustering_embeddings.py",
        "commit": bench.commit(),
        "machine": bench.machine(),
    }
    out.write_text(json.dumps(meta | {"runs": results}, indent=2) + "\n")
    print(
        "\n| split | pooling | global k | global metric | 1-NN task acc. | true-task silhouette | local acc. "
        "| global k found | global acc. | same partition as Euclidean |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        silhouette = "–" if r["true_task_silhouette"] is None else f"{r['true_task_silhouette']:.3f}"
        print(
            f"| {r['scenario']} s{r['seed']} | {r['pooling']} | {r['global_k_setting']} | {r['global_metric']} "
            f"| {r['nn_task_acc']:.3f} | {silhouette} | {r['cluster_acc_local']:.3f} | {r['global_k']} "
            f"| {r['cluster_acc_global']:.3f} | {'yes' if r['same_partition_as_euclidean'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
