"""The ServerApp logic: ask for centroids, cluster globally, train and average the shared adapters, evaluate.

``run_fedrouter(grid, cfg, run_dir)`` drives a whole run over a Flower ``Grid``; it is the same in simulation
and in a deployment, and the same for every method (``fedrouter.methods``): the method decides which adapters
the server keeps and what each client trains. Every reply is validated before use (``records``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedrouter.algorithm.aggregation import aggregate_clusters
from fedrouter.algorithm.clustering import global_clusters
from fedrouter.algorithm.metrics import ROUGE_KEYS, clustering_accuracy, matched_count, routing_accuracy
from fedrouter.algorithm.scheduling import learning_rate
from fedrouter.artifact import RouterArtifact
from fedrouter.config import Config
from fedrouter.federated import records
from fedrouter.federated.records import (
    Arrays,
    ReplyError,
    check_adapter,
    check_array,
    check_name,
    check_new_adapter,
    config_record,
    get_arrays,
    get_metrics,
    record_bytes,
    to_record,
)
from fedrouter.methods import ClientClusters, Job, Method, make_method, part_of
from fedrouter.model import EMBEDDED_NAME
from fedrouter.runlog import RunFolder

log = logging.getLogger("fedrouter")


class RunError(RuntimeError):
    """The run cannot go on (a client failed or sent an invalid reply)."""


def _exchange(grid: Grid, messages: list[Message], run: RunFolder, phase: str, timeout: float) -> list[Message]:
    """Push messages, pull replies as they arrive (one progress event each), raise on errors or timeout."""
    sent = {message.metadata.dst_node_id: message for message in messages}
    ids = list(grid.push_messages(messages))
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            run.event("reply", phase=phase, done=len(replies), total=len(messages))
        if pending:
            time.sleep(0.1)
    if pending:
        raise RunError(f"{phase}: {len(pending)} of {len(messages)} clients did not reply within {timeout:.0f}s")
    for reply in replies:
        if reply.has_error():
            node = reply.metadata.src_node_id
            raise RunError(f"{phase}: node {node} failed: {reply.error.reason}")
    order = {node: i for i, node in enumerate(sent)}
    return sorted(replies, key=lambda r: order.get(r.metadata.src_node_id, 0))


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float, run: RunFolder) -> list[int]:
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes[:wanted] if wanted else nodes
        if time.time() > deadline:
            raise RunError(f"only {len(nodes)} of {wanted} clients connected within {timeout:.0f}s")
        run.event("waiting", connected=len(nodes), wanted=wanted)
        time.sleep(1.0)


def _parse_clusters(reply: Message, cfg: Config, method: Method, hidden: int | None) -> ClientClusters:
    who = f"node {reply.metadata.src_node_id}"
    content = reply.content
    if "info" not in content.config_records:
        raise ReplyError(f"{who}: missing config record 'info'")
    info = content.config_records["info"]
    client_id = info.get("client_id")
    if not isinstance(client_id, int) or not 0 <= client_id < cfg["data.num_clients"]:
        raise ReplyError(f"{who}: client_id must be in 0..{cfg['data.num_clients'] - 1}, got {client_id!r}")
    tasks = [check_name(t, f"{who} task") for t in info.get("tasks", [])]
    clusters = get_arrays(content, "clusters", who)
    if method.clustering == "none":
        centroids = np.zeros((1, 0), dtype=np.float32)  # one local cluster: all of the client's samples
    else:
        centroids = check_array(clusters.get("centroids"), f"{who} centroids", shape=(None, hidden))
    k = len(centroids)
    if method.clustering == "task":
        k_limit = len(tasks)
    else:
        k_limit = cfg["cluster.local_k_max"] if cfg["cluster.local_k"] == "auto" else int(cfg["cluster.local_k"])
    if not 1 <= k <= max(k_limit, 1):
        raise ReplyError(f"{who}: sent {k} local clusters (expected 1..{max(k_limit, 1)})")
    counts = check_array(clusters.get("counts"), f"{who} counts", shape=(k,), kind="i")
    if (counts < 1).any():
        raise ReplyError(f"{who}: every local cluster must count at least one sample")
    labels = get_arrays(content, "labels", who)
    task_counts = check_array(labels.get("task_counts"), f"{who} task counts", shape=(k, len(tasks)), kind="i")
    if tasks and (task_counts.sum(1) != counts).any():
        raise ReplyError(f"{who}: task counts do not add up to the cluster counts")
    ks, scores = info.get("silhouette_k", []), info.get("silhouette", [])
    silhouette = {int(a): float(b) for a, b in zip(ks, scores, strict=False) if np.isfinite(b)}
    return ClientClusters(
        reply.metadata.src_node_id,
        client_id,
        centroids.astype(np.float32),
        counts,
        tasks,
        task_counts,
        silhouette,
    )


def _task_matrix(clients: list[ClientClusters], tasks: list[str], num: int) -> np.ndarray:
    """(global cluster x task) counts of training samples, from the clients' local histograms."""
    table = np.zeros((num, len(tasks)), dtype=np.int64)
    for client in clients:
        for local, g in enumerate(client.assignment):
            for j, task in enumerate(client.tasks):
                table[g, tasks.index(task)] += client.task_counts[local, j]
    return table


def _group_clusters(method: Method, clients: list[ClientClusters], cfg: Config) -> tuple[np.ndarray, dict]:
    """4. Global clusters: K-Means over all local centroids, or one per task (oracle), or one (no clustering).

    Sets every client's ``assignment`` (global cluster of each local cluster); returns the global centroids
    and the silhouette scores of the global search.
    """
    if method.clustering == "none":
        for client in clients:
            client.assignment = np.zeros(1, dtype=np.int64)
        return np.zeros((1, 0), dtype=np.float32), {}
    all_centroids = np.concatenate([c.centroids for c in clients])
    all_counts = np.concatenate([c.counts for c in clients]).astype(np.float64)
    if method.clustering == "task":
        tasks = sorted({t for c in clients for t in c.tasks})
        labels = np.concatenate([[tasks.index(t) for t in c.tasks] for c in clients]).astype(np.int64)
        centers = np.stack(
            [np.average(all_centroids[labels == g], axis=0, weights=all_counts[labels == g]) for g in range(len(tasks))]
        )
        scores: dict = {}
    else:
        k = cfg["cluster.global_k"]
        fitted = global_clusters(
            all_centroids,
            all_counts,
            k=k if k == "auto" else int(k),
            k_max=cfg["cluster.global_k_max"],
            threshold=cfg["cluster.silhouette_threshold"],
            seed=cfg["run.seed"],
        )
        labels, centers, scores = fitted.labels_, fitted.centers_, fitted.scores_
    offset = 0
    for client in clients:
        client.assignment = np.asarray(labels[offset : offset + len(client.centroids)], dtype=np.int64)
        offset += len(client.centroids)
    return centers.astype(np.float32), scores


def run_fedrouter(grid: Grid, cfg: Config, run_dir: Path) -> dict:
    """Run the configured method end to end; writes metrics (and a router artifact) into ``run_dir``."""
    run = RunFolder(run_dir, cfg)
    try:
        return _run(grid, cfg, run)
    except Exception as err:
        run.event("failed", error=str(err))
        raise
    finally:
        run.close()


def _job_record(jobs: list[Job]) -> ConfigRecord:
    """A round's jobs as parallel lists (configs carry plain values only)."""
    return ConfigRecord(
        {
            "names": [j.name for j in jobs],
            "shared": [j.shared or "" for j in jobs],
            "local_cluster": [-1 if j.local_cluster is None else int(j.local_cluster) for j in jobs],
            "personal": [j.personal or "" for j in jobs],
            "part": [j.part for j in jobs],
            "partner": [j.partner or "" for j in jobs],
        }
    )


def _run(grid: Grid, cfg: Config, run: RunFolder) -> dict:
    started = time.time()
    method = make_method(cfg)
    n = cfg["data.num_clients"]
    timeout = cfg["run.reply_timeout_s"]
    run.event(
        "start",
        clients=n,
        rounds=cfg["run.rounds"],
        model=cfg["model.name"],
        scenario=cfg["data.scenario"],
        method=method.name,
    )
    nodes = _wait_for_nodes(grid, cfg["run.min_clients"] or n, timeout, run)
    metrics: dict = {"config": cfg.to_dict(), "method": method.name, "rounds": [], "phases": {}}

    # 1-3. Local clustering on every client; centroids and counts come back (counts only without clustering).
    run.event("phase", name="clustering", round=0)
    t0 = time.time()
    messages = []
    for i, node in enumerate(nodes):
        extra = {"initial_adapter_seed": cfg["run.seed"]} if i == 0 else {}
        content = RecordDict({"config": config_record(cfg, **extra)})
        messages.append(Message(content, node, records.CLUSTER, group_id="0"))
    replies = _exchange(grid, messages, run, "clustering", timeout)
    clients: list[ClientClusters] = []
    hidden = None
    loads = 0
    for reply in replies:
        values = get_metrics(reply.content, "metrics", f"node {reply.metadata.src_node_id}")
        loads = max(loads, int(values.get("model_loads", 0)))
        metrics["phases"]["embed_s"] = metrics["phases"].get("embed_s", 0.0) + values.get("embed_s", 0.0)
        metrics["phases"]["local_cluster_s"] = metrics["phases"].get("local_cluster_s", 0.0) + values.get(
            "cluster_s", 0.0
        )
        parsed = _parse_clusters(reply, cfg, method, hidden)
        hidden = parsed.centroids.shape[1] if method.clustering != "none" else None
        clients.append(parsed)
    clients.sort(key=lambda c: c.client_id)  # node ids are random per run; client ids make runs reproducible
    ids = [c.client_id for c in clients]
    if len(set(ids)) != len(ids):
        raise RunError(f"clustering: two nodes claim the same client id ({sorted(ids)})")
    initial = check_new_adapter(get_arrays(replies[0].content, "initial_adapter", "first node"), "initial adapter")
    shapes = {key: value.shape for key, value in initial.items()}
    cluster_bytes_up = sum(record_bytes(*r.content.array_records.values()) for r in replies)

    # 4. Global clustering over all local centroids.
    centers, global_scores = _group_clusters(method, clients, cfg)
    num_global = len(centers)
    tasks = sorted({t for c in clients for t in c.tasks})
    train_table = _task_matrix(clients, tasks, num_global)
    clustered = method.clustering != "none"
    local_matched = sum(matched_count(c.task_counts) for c in clients)
    clustering = {
        "local_k": {c.client_id: len(c.centroids) for c in clients},
        "global_k": num_global,
        "cluster_acc_local": local_matched / sum(c.num_samples for c in clients) if tasks and clustered else None,
        "cluster_acc_global": clustering_accuracy(train_table) if tasks and clustered else None,
        "global_cluster_tasks": {
            g: {tasks[j]: int(train_table[g, j]) for j in range(len(tasks)) if train_table[g, j]}
            for g in range(num_global)
        },
        "silhouette_local": {c.client_id: c.silhouette for c in clients},
        "silhouette_global": global_scores,
        "cluster_map": {c.client_id: c.assignment.tolist() for c in clients},
    }
    metrics["clustering"] = clustering
    metrics["phases"]["clustering_s"] = time.time() - t0
    run.event(
        "clustered",
        local_k=clustering["local_k"],
        global_k=num_global,
        cluster_acc_local=clustering["cluster_acc_local"],
        cluster_acc_global=clustering["cluster_acc_global"],
        global_cluster_tasks=clustering["global_cluster_tasks"],
    )
    run.write_metrics(metrics)
    shared = method.shared_adapters(initial, num_global)
    by_node = {c.node_id: c for c in clients}

    def save_artifact() -> None:
        if method.serving not in ("route", "task"):
            return  # only routers have a router artifact; baselines report metrics
        RouterArtifact(
            base_model=_base_model_name(cfg),
            model_name=cfg["model.name"],
            lora={
                "r": cfg["lora.r"],
                "lora_alpha": cfg["lora.alpha"],
                "lora_dropout": cfg["lora.dropout"],
                "target_modules": cfg.list("lora.target_modules"),
            },
            global_centroids=centers,
            local_centroids={c.client_id: c.centroids for c in clients},
            cluster_map={c.client_id: c.assignment.tolist() for c in clients},
            adapters={int(key): arrays for key, arrays in shared.items()},
            precision=cfg["model.precision"],
            max_seq_len=cfg["model.max_seq_len"],
        ).save(run.path)

    save_artifact()

    # 5-6. Training rounds: each client trains its jobs; the server averages each shared adapter.
    rounds = cfg["run.rounds"]
    for r in range(rounds):
        t0 = time.time()
        lr = learning_rate(cfg["train.lr"], r, rounds, cfg["train.lr_schedule"], cfg["train.lr_min_ratio"])
        run.event("phase", name="training", round=r + 1, rounds=rounds, lr=lr)
        messages, plan = [], {}
        for node in nodes:
            jobs = method.jobs(r, by_node[node])
            plan[node] = jobs
            content = RecordDict(
                {"config": config_record(cfg, round=r, lr=lr), "jobs": _job_record(jobs)}
                | {
                    f"adapter.{job.name}": to_record(part_of(shared[job.shared], job.part), cfg["train.adapter_dtype"])
                    for job in jobs
                    if job.shared is not None and job.part != "none"
                }
            )
            messages.append(Message(content, node, records.TRAIN, group_id=str(r + 1)))
        bytes_down = sum(record_bytes(*m.content.array_records.values()) for m in messages)
        replies = _exchange(grid, messages, run, f"training round {r + 1}", timeout)
        updates, losses = [], defaultdict(list)
        bytes_up = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            client = by_node[node]
            who = f"client {client.client_id}"
            values = get_metrics(reply.content, "metrics", who)
            loads = max(loads, int(values.get("model_loads", 0)))
            for job in plan[node]:
                count = values.get(f"num_samples.{job.name}", 0)
                expected = client.num_samples if job.local_cluster is None else client.counts[job.local_cluster]
                if count != expected:
                    raise ReplyError(f"{who}: trained job '{job.name}' on {count} samples, expected {expected}")
                losses[job.shared or f"personal:{job.name}"].append(values.get(f"loss.{job.name}", float("nan")))
                if job.shared is None or job.part == "none":
                    continue
                reference = {key: shapes[key] for key in part_of(initial, job.part)}
                arrays = check_adapter(
                    get_arrays(reply.content, f"adapter.{job.name}", who), reference, f"{who} adapter {job.name}"
                )
                updates.append((job.shared, arrays, float(count)))
            bytes_up += record_bytes(*reply.content.array_records.values())
        shared, weights = aggregate_clusters(shared, updates)
        record = {
            "round": r + 1,
            "lr": lr,
            "seconds": time.time() - t0,
            "train_loss": {key: float(np.mean(v)) for key, v in sorted(losses.items())},
            "updated_adapters": sorted(weights),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        if cfg["eval.round_samples"] and "personalized" in cfg.eval_sets:
            curve = _evaluate(
                grid,
                cfg,
                run,
                method,
                nodes,
                by_node,
                centers,
                shared,
                train_table,
                tasks,
                limit=cfg["eval.round_samples"],
            )
            record["eval"] = curve["evaluation"]["overall"]
        metrics["rounds"].append(record)
        run.event("round", **record)
        run.write_metrics(metrics)
        save_artifact()

    metrics["phases"]["training_s"] = sum(r["seconds"] for r in metrics["rounds"])
    metrics["bytes"] = {
        "up_total": sum(r["bytes_up"] for r in metrics["rounds"]) + cluster_bytes_up,
        "down_total": sum(r["bytes_down"] for r in metrics["rounds"]),
        "adapter_bytes": int(sum(v.nbytes for v in initial.values())),
    }
    metrics["model_loads_per_process"] = loads
    if cfg.eval_sets:
        metrics.update(_evaluate(grid, cfg, run, method, nodes, by_node, centers, shared, train_table, tasks))
    metrics["wall_s"] = time.time() - started
    run.write_metrics(metrics)
    run.event("done", wall_s=metrics["wall_s"], evaluation=metrics.get("evaluation", {}).get("overall", {}))
    return metrics


def _evaluate(
    grid: Grid,
    cfg: Config,
    run: RunFolder,
    method: Method,
    nodes: list[int],
    by_node: dict[int, ClientClusters],
    global_centroids: np.ndarray,
    shared: dict[str, Arrays],
    train_table: np.ndarray,
    tasks: list[str],
    limit: int = 0,
) -> dict:
    """7. Every client picks an adapter per test sample (the method's serving rule), generates and scores.

    ``limit`` > 0: a learning-curve check after a round: only the first ``limit`` personalized test samples
    per (client, task).
    """
    started = time.time()
    if not limit:
        run.event("phase", name="evaluation", round=cfg["run.rounds"])
    subset = {"limit": limit, "sets": ["personalized"]} if limit else {}
    messages = []
    for node in nodes:
        client = by_node[node]
        content = RecordDict(
            {
                "config": config_record(cfg, serving=method.serving, adapter_keys=sorted(shared), **subset),
                "adapter_tasks": ConfigRecord({"tasks": tasks if method.serving == "task" else []}),
            }
            | {f"adapter.{key}": to_record(arrays, cfg["train.adapter_dtype"]) for key, arrays in shared.items()}
        )
        if method.serving in ("route", "task"):
            content["routing"] = to_record(
                {"global_centroids": global_centroids, "local_to_global": client.assignment.astype(np.int64)}
            )
        messages.append(Message(content, node, records.EVALUATE, group_id="eval"))
    replies = _exchange(grid, messages, run, "round check" if limit else "evaluation", cfg["run.reply_timeout_s"])
    per_client = {
        by_node[r.metadata.src_node_id].client_id: get_metrics(r.content, "metrics", f"node {r.metadata.src_node_id}")
        for r in replies
    }
    return {
        "evaluation": summarize_evaluation(per_client, train_table, tasks),
        "evaluation_s": time.time() - started,
        "eval_bytes_down": sum(record_bytes(*m.content.array_records.values()) for m in messages),
        "eval_tokens": int(sum(v.get("generated_tokens", 0) for v in per_client.values())),
        "eval_model_loads_per_process": int(max(v.get("model_loads", 0) for v in per_client.values())),
    }


def summarize_evaluation(per_client: dict[int, dict[str, float]], train_table: np.ndarray, tasks: list[str]) -> dict:
    """Per (test set, routing mode): ROUGE and exact match per client and task, macro averages, routing accuracy.

    Clients send sums and counts keyed ``<set>.<mode>.<task>.<metric>``; macro averages weight every
    (client, task) pair equally.
    """
    table: dict[tuple[str, str], dict[int, dict[str, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    routed: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros_like(train_table))
    for client, values in per_client.items():
        grouped: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
        for key, value in values.items():
            parts = key.split(".")
            if len(parts) == 4:
                grouped[tuple(parts[:3])][parts[3]] = value
            elif len(parts) == 5 and parts[3] == "route":
                set_name, mode, task = parts[:3]
                g = int(parts[4])
                if task in tasks and 0 <= g < len(train_table):
                    routed[(set_name, mode)][g, tasks.index(task)] += int(value)
        for (set_name, mode, task), sums in grouped.items():
            n = sums.get("n", 0)
            if n > 0:
                table[(set_name, mode)][client][task] = {
                    k: sums[k] / n for k in (*ROUGE_KEYS, "exact_match") if k in sums
                } | {"n": n}
    result: dict = {"by_set": {}, "overall": {}}
    for (set_name, mode), clients in sorted(table.items()):
        cells = [scores for by_task in clients.values() for scores in by_task.values()]
        per_task = defaultdict(list)
        for by_task in clients.values():
            for task, scores in by_task.items():
                per_task[task].append(scores)
        summary = {key: float(np.mean([c[key] for c in cells])) for key in (*ROUGE_KEYS, "exact_match")}
        routing_acc = routing_accuracy(routed[(set_name, mode)], train_table)
        summary["routing_acc"] = None if np.isnan(routing_acc) else routing_acc
        summary["per_task"] = {
            task: {key: float(np.mean([c[key] for c in cs])) for key in (*ROUGE_KEYS, "exact_match")}
            for task, cs in sorted(per_task.items())
        }
        summary["per_client"] = {
            client: {task: {k: v for k, v in scores.items()} for task, scores in sorted(by_task.items())}
            for client, by_task in sorted(clients.items())
        }
        result["by_set"][f"{set_name}/{mode}"] = summary
        result["overall"][f"{set_name}/{mode}"] = {
            k: summary[k] for k in ("rouge1", "rouge2", "rougeL", "exact_match", "routing_acc")
        }
    return result


def _base_model_name(cfg: Config) -> str:
    return EMBEDDED_NAME if cfg["model.name"] == "smollm2" else cfg["model.name"]
