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

from fedrouter import discovery
from fedrouter.algorithm.aggregation import aggregate_clusters
from fedrouter.algorithm.clustering import cluster_means, join_clusters, join_radius
from fedrouter.algorithm.metrics import ROUGE_KEYS, clustering_accuracy, matched_count, routing_accuracy
from fedrouter.algorithm.scheduling import learning_rate
from fedrouter.artifact import RouterArtifact
from fedrouter.config import Config
from fedrouter.federated import records
from fedrouter.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
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


NODE_CHECK_S = 5.0  # how often a phase checks that the nodes it waits for are still connected


class RunError(RuntimeError):
    """The run cannot go on (too few valid client replies, or a checkpoint that does not fit)."""


def _reject(run: RunFolder, phase: str, who: str, reason: str) -> None:
    """A reply the server refuses: logged and kept in the event stream; the run goes on without it."""
    log.warning("%s: rejected %s: %s", phase, who, reason)
    run.event("rejected", phase=phase, who=who, reason=reason)


def _exchange(
    grid: Grid, messages: list[Message], run: RunFolder, phase: str, timeout: float, names: dict[int, str]
) -> tuple[list[Message], dict[str, str]]:
    """Push messages and pull replies as they arrive (one progress event each).

    Returns the replies without error, in the order the messages were sent, and for every client that
    failed (an error reply: a crash or a lost node; or no reply within ``timeout``) why, keyed by its name.
    """
    targets = [message.metadata.dst_node_id for message in messages]
    ids = list(grid.push_messages(messages))
    node_of = dict(zip(ids, targets, strict=True))
    pending = set(ids)
    replies: list[Message] = []
    failed: dict[str, str] = {}
    deadline = time.time() + timeout
    next_check = time.time() + NODE_CHECK_S
    while pending and time.time() < deadline:
        if time.time() >= next_check:  # a node that stopped sending heartbeats will not reply: stop waiting
            online = set(grid.get_node_ids())
            for message_id in [m for m in pending if node_of[m] not in online]:
                pending.discard(message_id)
                node = node_of[message_id]
                failed[names.get(node, f"node {node}")] = "disconnected (Flower lists the node as offline)"
            next_check = time.time() + NODE_CHECK_S
        for reply in grid.pull_messages(list(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            pending.discard(message_id)
            node = node_of[message_id]
            if reply.has_error():
                failed[names.get(node, f"node {node}")] = f"failed: {_short(reply.error.reason)}"
            else:
                replies.append(reply)
            run.event("reply", phase=phase, done=len(replies) + len(failed), total=len(messages))
        if pending:
            time.sleep(0.1)
    for message_id in pending:
        node = node_of[message_id]
        failed[names.get(node, f"node {node}")] = f"no reply within {timeout:.0f}s"
    for who, reason in failed.items():
        _reject(run, phase, who, reason)
    order = {node: i for i, node in enumerate(targets)}
    return sorted(replies, key=lambda r: order.get(r.metadata.src_node_id, 0)), failed


def _short(reason: str) -> str:
    """Flower's error reason can carry a whole remote traceback: keep the message at its end."""
    return reason.rsplit("Message:", 1)[-1].strip(" '>\n")[-300:]


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
    spreads = None
    if "spreads" in clusters:
        spreads = check_array(clusters["spreads"], f"{who} spreads", shape=(k,))
        if not (spreads >= 0).all():
            raise ReplyError(f"{who}: a cluster spread is negative")
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
        counts.astype(np.int64),
        tasks,
        task_counts.astype(np.int64),
        silhouette,
        spreads=None if spreads is None else spreads.astype(np.float64),
    )


def _cluster_clients(
    grid: Grid, cfg: Config, run: RunFolder, method: Method, nodes: list[int], hidden: int | None, taken: set[int]
) -> tuple[list[ClientClusters], dict]:
    """Ask ``nodes`` to cluster their samples; the valid replies (sorted by client id) and the phase's figures.

    A reply is rejected when it is malformed or claims a client id in ``taken`` or already claimed.
    """
    messages = [Message(RecordDict({"config": config_record(cfg)}), n, records.CLUSTER, group_id="0") for n in nodes]
    replies, rejected = _exchange(grid, messages, run, "clustering", cfg["run.reply_timeout_s"], {})
    clients: list[ClientClusters] = []
    figures = {"embed_s": 0.0, "local_cluster_s": 0.0, "bytes_up": 0, "model_loads": 0, "rejected": rejected}
    for reply in replies:
        who = f"node {reply.metadata.src_node_id}"
        figures["bytes_up"] += record_bytes(*reply.content.array_records.values())
        try:
            values = get_metrics(reply.content, "metrics", who)
            parsed = _parse_clusters(reply, cfg, method, hidden)
            if parsed.client_id in taken:
                raise ReplyError(f"{who}: client id {parsed.client_id} is already taken by another node")
        except ReplyError as err:
            rejected[who] = str(err)
            _reject(run, "clustering", who, str(err))
            continue
        taken.add(parsed.client_id)
        figures["embed_s"] += values.get("embed_s", 0.0)
        figures["local_cluster_s"] += values.get("cluster_s", 0.0)
        figures["model_loads"] = max(figures["model_loads"], int(values.get("model_loads", 0)))
        if method.clustering != "none":
            hidden = parsed.centroids.shape[1]
        clients.append(parsed)
    return sorted(clients, key=lambda c: c.client_id), figures


def _refine_clients(
    grid: Grid, cfg: Config, run: RunFolder, method: Method, clients: list[ClientClusters], centers: np.ndarray
) -> tuple[list[ClientClusters], int, int]:
    """Send ``centers`` to every client, which splits the local clusters they tell apart
    (``discovery.refine_samples``); the clients' new clusters, and the bytes that went up and down.

    A client whose reply fails or does not check out takes no further part: its node may already hold the
    refined clusters, which the server then does not know.
    """
    content = {"global": to_record({"centroids": centers})}
    messages = [
        Message(RecordDict({"config": config_record(cfg)} | content), c.node_id, records.REFINE, group_id="0")
        for c in clients
    ]
    names = {c.node_id: f"client {c.client_id}" for c in clients}
    replies, _ = _exchange(grid, messages, run, "refinement", cfg["run.reply_timeout_s"], names)
    by_node = {c.node_id: c for c in clients}
    refined = []
    down = sum(record_bytes(*m.content.array_records.values()) for m in messages)
    up = 0
    hidden = centers.shape[1]
    for reply in replies:
        old = by_node[reply.metadata.src_node_id]
        who = names[old.node_id]
        up += record_bytes(*reply.content.array_records.values())
        try:
            new = _parse_clusters(reply, cfg, method, hidden)
            if new.client_id != old.client_id:
                raise ReplyError(f"{who}: answered as client {new.client_id}")
        except ReplyError as err:
            _reject(run, "refinement", who, str(err))
            continue
        new.silhouette = old.silhouette  # the search ran once, in the clustering phase
        refined.append(new)
    return refined, up, down


def _initial_adapter(grid: Grid, cfg: Config, run: RunFolder, clients: list[ClientClusters]) -> tuple[Arrays, int]:
    """The common starting adapter, from the first client that sends a valid one; and its size in bytes."""
    for client in clients:
        message = Message(RecordDict({"config": config_record(cfg)}), client.node_id, records.INITIAL, group_id="0")
        who = f"client {client.client_id}"
        replies, _ = _exchange(grid, [message], run, "initial adapter", cfg["run.reply_timeout_s"], {})
        for reply in replies:
            try:
                adapter = check_new_adapter(get_arrays(reply.content, "initial_adapter", who), f"{who} initial adapter")
            except ReplyError as err:
                _reject(run, "initial adapter", who, str(err))
                continue
            return adapter, record_bytes(*reply.content.array_records.values())
    raise RunError("initial adapter: no client sent a valid one")


def _task_matrix(clients: list[ClientClusters], tasks: list[str], num: int) -> np.ndarray:
    """(global cluster x task) counts of training samples, from the clients' local histograms."""
    table = np.zeros((num, len(tasks)), dtype=np.int64)
    for client in clients:
        for local, g in enumerate(client.assignment):
            for j, task in enumerate(client.tasks):
                table[g, tasks.index(task)] += client.task_counts[local, j]
    return table


def _group_clusters(method: Method, clients: list[ClientClusters], cfg: Config) -> tuple[np.ndarray, dict]:
    """4. Global clusters of all local centroids (`discovery.cluster_centroids`), one per task (oracle), or one.

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
        centers = cluster_means(all_centroids, labels, all_counts)
        scores: dict = {}
    else:
        spreads = [c.spreads for c in clients]
        all_spreads = None if any(s is None for s in spreads) else np.concatenate(spreads)
        fitted = discovery.cluster_centroids(cfg, all_centroids, all_counts, all_spreads)
        labels, centers, scores = fitted.labels_, fitted.centers_, fitted.scores_
    offset = 0
    for client in clients:
        client.assignment = np.asarray(labels[offset : offset + len(client.centroids)], dtype=np.int64)
        offset += len(client.centroids)
    return centers.astype(np.float32), scores


def _join(method: Method, cfg: Config, state: ServerState, client: ClientClusters) -> list[int]:
    """Place a client that arrived after the global clustering; returns the global clusters it opened.

    Without clustering every client holds the one shared cluster. Otherwise each local centroid joins the
    nearest global cluster if it lies within ``cluster.join_factor`` x the widest cluster's radius of its
    centroid, else it opens a new global cluster (``fedrouter.algorithm.clustering.join_clusters``), whose
    adapter starts from the common initial adapter.
    """
    if method.clustering == "none":
        client.assignment = np.zeros(1, dtype=np.int64)
        return []
    members = [c for c in state.clients if len(c.assignment)]
    radius = join_radius(
        np.concatenate([c.centroids for c in members]), np.concatenate([c.assignment for c in members]), state.centers
    )
    before = len(state.centers)
    client.assignment, centers = join_clusters(client.centroids, state.centers, radius, cfg["cluster.join_factor"])
    state.centers = centers.astype(np.float32)
    opened = list(range(before, len(state.centers)))
    for g in opened:
        method.add_global_cluster(state.shared, state.initial, g)
    return opened


def _clustering_summary(state: ServerState, method: Method, global_scores: dict) -> dict:
    clients = state.clients
    tasks = _tasks(clients)
    table = _task_matrix(clients, tasks, len(state.centers))
    clustered = method.clustering != "none"
    local_matched = sum(matched_count(c.task_counts) for c in clients)
    return {
        "local_k": {c.client_id: len(c.centroids) for c in clients},
        "global_k": len(state.centers),
        "cluster_acc_local": local_matched / sum(c.num_samples for c in clients) if tasks and clustered else None,
        "cluster_acc_global": clustering_accuracy(table) if tasks and clustered else None,
        "global_cluster_tasks": {
            g: {tasks[j]: int(table[g, j]) for j in range(len(tasks)) if table[g, j]} for g in range(len(table))
        },
        "silhouette_local": {c.client_id: c.silhouette for c in clients},
        "silhouette_global": global_scores,
        "cluster_map": {c.client_id: c.assignment.tolist() for c in clients},
    }


def _tasks(clients: list[ClientClusters]) -> list[str]:
    return sorted({t for c in clients for t in c.tasks})


def run_fedrouter(grid: Grid, cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Run the configured method end to end; writes metrics, a checkpoint per round (and a router artifact).

    ``resume``: go on from ``run_dir``'s checkpoint instead of starting over.
    """
    run = RunFolder(run_dir, cfg)
    try:
        return _run(grid, cfg, run, resume)
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


def _start(grid: Grid, cfg: Config, run: RunFolder, method: Method, nodes: list[int]) -> ServerState:
    """1-4. Local clustering on every client (centroids and counts come back), then the global clustering."""
    run.event("phase", name="clustering", round=0)
    t0 = time.time()
    clients, figures = _cluster_clients(grid, cfg, run, method, nodes, None, set())
    if len(clients) < cfg["run.min_replies"]:
        reasons = "; ".join(f"{who}: {why}" for who, why in list(figures["rejected"].items())[:3])
        raise RunError(
            f"clustering: {len(clients)} valid replies, 'run.min_replies' asks for {cfg['run.min_replies']}"
            + (f" (rejected: {reasons})" if reasons else "")
        )
    initial, initial_bytes = _initial_adapter(grid, cfg, run, clients)
    centers, global_scores = _group_clusters(method, clients, cfg)
    local_k_first = {c.client_id: len(c.centroids) for c in clients}
    refinements, refine_up, refine_down = [], 0, 0
    for _ in range(discovery.refines(cfg) if method.clustering == "kmeans" else 0):
        run.event("phase", name="refinement", round=0)
        clients, up, down = _refine_clients(grid, cfg, run, method, clients, centers)
        refine_up, refine_down = refine_up + up, refine_down + down
        if len(clients) < cfg["run.min_replies"]:
            raise RunError(f"refinement: {len(clients)} valid replies, 'run.min_replies' asks for more")
        refinements.append(centers)
        centers, global_scores = _group_clusters(method, clients, cfg)
    metrics: dict = {
        "config": cfg.to_dict(),
        "method": method.name,
        "rounds": [],
        "phases": {"embed_s": figures["embed_s"], "local_cluster_s": figures["local_cluster_s"]},
        "clustering_rejected": figures["rejected"],
        "clustering_bytes_up": figures["bytes_up"] + initial_bytes + refine_up,
        "clustering_bytes_down": refine_down,  # the global centroids each refinement round sends
        "model_loads_per_process": figures["model_loads"],
    }
    state = ServerState(clients, centers, method.shared_adapters(initial, len(centers)), initial, metrics)
    state.refinements = refinements
    state.refused = set(nodes) - {c.node_id for c in clients}
    metrics["clustering"] = _clustering_summary(state, method, global_scores)
    metrics["clustering"]["local_k_before_refinement"] = local_k_first
    metrics["phases"]["clustering_s"] = time.time() - t0
    clustering = metrics["clustering"]
    run.event(
        "clustered",
        local_k=clustering["local_k"],
        global_k=clustering["global_k"],
        cluster_acc_local=clustering["cluster_acc_local"],
        cluster_acc_global=clustering["cluster_acc_global"],
        global_cluster_tasks=clustering["global_cluster_tasks"],
    )
    return state


def _resume(grid: Grid, cfg: Config, run: RunFolder, method: Method, nodes: list[int]) -> ServerState:
    """Load the checkpoint; the clients cluster again (their local state is gone) and must match it."""
    state, seed = load_checkpoint(run.path)
    if seed != cfg["run.seed"]:
        raise RunError(f"resume: the checkpoint was made with run.seed={seed}, the config says {cfg['run.seed']}")
    if method.personal_state and state.rounds_done > 0:
        raise RunError(
            f"resume: method {method.name!r} keeps personal adapters on the clients, which a new run does not "
            "have; resume supports fedrouter, oracle and fedit"
        )
    run.event("resumed", rounds_done=state.rounds_done)
    saved = {c.client_id: c for c in state.clients}
    fresh, _ = _cluster_clients(grid, cfg, run, method, nodes, None, set())
    fresh = _replay_refinements(grid, cfg, run, method, state, fresh)
    state.refused = set(nodes) - {c.node_id for c in fresh}
    for client in fresh:
        old = saved.get(client.client_id)
        if old is None:  # not in the checkpoint: it joins like a late client
            _admit(run, method, cfg, state, client)
        elif _same_clusters(old, client, cfg):
            old.node_id = client.node_id
        else:
            _reject(run, "resume", f"client {client.client_id}", "its local clusters differ from the checkpoint's")
            state.refused.add(client.node_id)
    state.metrics["clustering"] = _clustering_summary(state, method, state.metrics["clustering"]["silhouette_global"])
    active = [c for c in state.clients if c.node_id >= 0]
    if len(active) < cfg["run.min_replies"]:
        raise RunError(f"resume: {len(active)} clients match the checkpoint, 'run.min_replies' asks for more")
    state.metrics.setdefault("resumed", []).append({"after_round": state.rounds_done})
    return state


def _replay_refinements(
    grid: Grid, cfg: Config, run: RunFolder, method: Method, state: ServerState, clients: list[ClientClusters]
) -> list[ClientClusters]:
    """Clients that cluster after the run's clustering phase (resumed, late) refine against the same global
    centroids, in the same order, as the first clients did, so a returning client finds its clusters again."""
    for centers in state.refinements:
        if not clients:
            break
        clients, _, _ = _refine_clients(grid, cfg, run, method, clients, centers)
    return clients


def _same_clusters(saved: ClientClusters, fresh: ClientClusters, cfg: Config) -> bool:
    """A returning client clustered as before (noisy centroids can only be compared by shape and counts)."""
    if saved.centroids.shape != fresh.centroids.shape or not (saved.counts == fresh.counts).all():
        return False
    return cfg["privacy.centroid_noise"] > 0 or bool(
        np.allclose(saved.centroids, fresh.centroids, rtol=1e-3, atol=1e-4)
    )


def _admit(run: RunFolder, method: Method, cfg: Config, state: ServerState, client: ClientClusters) -> None:
    opened = _join(method, cfg, state, client)
    state.clients.append(client)
    state.clients.sort(key=lambda c: c.client_id)
    run.event("joined", client=client.client_id, assignment=client.assignment.tolist(), new_clusters=opened)


def _admit_late_clients(grid: Grid, cfg: Config, run: RunFolder, method: Method, state: ServerState) -> None:
    """Nodes that connected after the clustering: they cluster locally and join (see ``_join``)."""
    known = {c.node_id for c in state.clients} | state.refused
    room = cfg["data.num_clients"] - sum(c.node_id >= 0 for c in state.clients)
    new = [node for node in sorted(grid.get_node_ids()) if node not in known][: max(room, 0)]
    if not new:
        return
    hidden = state.centers.shape[1] if method.clustering != "none" else None
    active = {c.client_id for c in state.clients if c.node_id >= 0}
    absent = {c.client_id: c for c in state.clients if c.node_id < 0}
    clients, _ = _cluster_clients(grid, cfg, run, method, new, hidden, set(active))
    clients = _replay_refinements(grid, cfg, run, method, state, clients)
    state.refused |= set(new) - {c.node_id for c in clients}  # a rejected node takes no further part
    for client in clients:
        old = absent.get(client.client_id)
        if old is None:
            _admit(run, method, cfg, state, client)
        elif _same_clusters(old, client, cfg):  # a client of the checkpoint that came back
            old.node_id = client.node_id
            run.event("rejoined", client=client.client_id)
        else:
            _reject(run, "join", f"client {client.client_id}", "its local clusters differ from the checkpoint's")
            state.refused.add(client.node_id)
    scores = state.metrics["clustering"].get("silhouette_global", {})
    state.metrics["clustering"] = _clustering_summary(state, method, scores)


def _train_round(grid: Grid, cfg: Config, run: RunFolder, method: Method, state: ServerState, r: int) -> dict:
    """5-6. Each client trains its jobs; the server averages each shared adapter over the valid replies."""
    t0 = time.time()
    rounds = cfg["run.rounds"]
    lr = learning_rate(cfg["train.lr"], r, rounds, cfg["train.lr_schedule"], cfg["train.lr_min_ratio"])
    run.event("phase", name="training", round=r + 1, rounds=rounds, lr=lr)
    active = [c for c in state.clients if c.node_id >= 0]
    by_node = {c.node_id: c for c in active}
    shapes = {key: value.shape for key, value in state.initial.items()}
    messages, plan = [], {}
    method.schedule(state.clients)
    for client in active:
        jobs = method.jobs(r, client)
        plan[client.node_id] = jobs
        content = RecordDict(
            {"config": config_record(cfg, round=r, lr=lr), "jobs": _job_record(jobs)}
            | {
                f"adapter.{job.name}": to_record(
                    part_of(state.shared[job.shared], job.part), cfg["train.adapter_dtype"]
                )
                for job in jobs
                if job.shared is not None and job.part != "none"
            }
        )
        messages.append(Message(content, client.node_id, records.TRAIN, group_id=str(r + 1)))
    bytes_down = sum(record_bytes(*m.content.array_records.values()) for m in messages)
    phase = f"training round {r + 1}"
    names = {node: f"client {c.client_id}" for node, c in by_node.items()}
    replies, rejected = _exchange(grid, messages, run, phase, cfg["run.reply_timeout_s"], names)
    updates, losses = [], defaultdict(list)
    bytes_up = 0
    for reply in replies:
        node = reply.metadata.src_node_id
        client = by_node[node]
        who = names[node]
        bytes_up += record_bytes(*reply.content.array_records.values())
        try:  # every part of a reply is checked before any of it is used
            values = get_metrics(reply.content, "metrics", who)
            mine, my_losses = [], {}
            for job in plan[node]:
                count = values.get(f"num_samples.{job.name}", 0)
                expected = client.num_samples if job.local_cluster is None else client.counts[job.local_cluster]
                if count != expected:
                    raise ReplyError(f"{who}: trained job '{job.name}' on {count} samples, expected {expected}")
                my_losses[job.shared or f"personal:{job.name}"] = values.get(f"loss.{job.name}", float("nan"))
                if job.shared is None or job.part == "none":
                    continue
                reference = {key: shapes[key] for key in part_of(state.initial, job.part)}
                arrays = check_adapter(
                    get_arrays(reply.content, f"adapter.{job.name}", who), reference, f"{who} adapter {job.name}"
                )
                mine.append((job.shared, arrays, float(count)))
        except ReplyError as err:
            rejected[who] = str(err)
            _reject(run, phase, who, str(err))
            continue
        updates += mine
        for key, loss in my_losses.items():
            losses[key].append(loss)
        state.metrics["model_loads_per_process"] = max(
            state.metrics.get("model_loads_per_process", 0), int(values.get("model_loads", 0))
        )
    accepted = len(active) - len(rejected)
    counted = accepted >= cfg["run.min_replies"]
    weights: dict = {}
    if counted:
        state.shared, weights = aggregate_clusters(state.shared, updates)
    else:
        run.event("round_not_counted", round=r + 1, accepted=accepted, min_replies=cfg["run.min_replies"])
    return {
        "round": r + 1,
        "lr": lr,
        "seconds": time.time() - t0,
        "counted": counted,
        "accepted": accepted,
        "rejected": rejected,
        "train_loss": {key: float(np.mean(v)) for key, v in sorted(losses.items())},
        "updated_adapters": sorted(weights),
        "adapter_norms": {
            key: float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in arrays.values())))
            for key, arrays in state.shared.items()
        },
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
    }


def _run(grid: Grid, cfg: Config, run: RunFolder, resume: bool) -> dict:
    started = time.time()
    method = make_method(cfg)
    n = cfg["data.num_clients"]
    run.event(
        "start",
        clients=n,
        rounds=cfg["run.rounds"],
        model=cfg["model.name"],
        scenario=cfg["data.scenario"],
        method=method.name,
    )
    nodes = _wait_for_nodes(grid, cfg["run.min_clients"] or n, cfg["run.reply_timeout_s"], run)
    state = _resume(grid, cfg, run, method, nodes) if resume else _start(grid, cfg, run, method, nodes)
    metrics = state.metrics
    elapsed_before = metrics.get("elapsed_s", 0.0)

    def save() -> None:
        metrics["elapsed_s"] = elapsed_before + time.time() - started
        run.write_metrics(metrics)
        if method.serving in ("route", "task"):  # only routers have a router artifact; baselines report metrics
            _router_artifact(cfg, state).save(run.path)
        save_checkpoint(run.path, state, cfg["run.seed"])

    save()
    rounds = cfg["run.rounds"] if method.trains else 0  # zero-shot: clustering, then evaluation
    for r in range(state.rounds_done, rounds):
        _admit_late_clients(grid, cfg, run, method, state)
        record = _train_round(grid, cfg, run, method, state, r)
        if cfg["eval.round_samples"] and "personalized" in cfg.eval_sets:
            curve = _evaluate(grid, cfg, run, method, state, limit=cfg["eval.round_samples"])
            record["eval"] = curve["evaluation"]["overall"]
        metrics["rounds"].append(record)
        state.rounds_done = r + 1
        save()  # metrics and checkpoint first: whoever sees the "round" event can rely on the round being saved
        run.event("round", **record)

    metrics["phases"]["training_s"] = sum(r["seconds"] for r in metrics["rounds"])
    metrics["bytes"] = {
        "up_total": sum(r["bytes_up"] for r in metrics["rounds"]) + metrics["clustering_bytes_up"],
        "down_total": sum(r["bytes_down"] for r in metrics["rounds"]) + metrics.get("clustering_bytes_down", 0),
        "adapter_bytes": int(sum(v.nbytes for v in state.initial.values())),
    }
    if cfg.eval_sets:
        metrics.update(_evaluate(grid, cfg, run, method, state))
    metrics["wall_s"] = elapsed_before + time.time() - started
    metrics["elapsed_s"] = metrics["wall_s"]
    run.write_metrics(metrics)
    run.event("done", wall_s=metrics["wall_s"], evaluation=metrics.get("evaluation", {}).get("overall", {}))
    return metrics


def _router_artifact(cfg: Config, state: ServerState) -> RouterArtifact:
    return RouterArtifact(
        base_model=_base_model_name(cfg),
        model_name=cfg["model.name"],
        lora={
            "r": cfg["lora.r"],
            "lora_alpha": cfg["lora.alpha"],
            "lora_dropout": cfg["lora.dropout"],
            "target_modules": cfg.list("lora.target_modules"),
        },
        global_centroids=state.centers,
        local_centroids={c.client_id: c.centroids for c in state.clients},
        cluster_map={c.client_id: c.assignment.tolist() for c in state.clients},
        adapters={int(key): arrays for key, arrays in state.shared.items()},
        precision=cfg["model.precision"],
        max_seq_len=cfg["model.max_seq_len"],
        embedding=discovery.EmbeddingSettings.of(cfg),
    )


def _evaluate(grid: Grid, cfg: Config, run: RunFolder, method: Method, state: ServerState, limit: int = 0) -> dict:
    """7. Every client picks an adapter per test sample (the method's serving rule), generates and scores.

    ``limit`` > 0: a learning-curve check after a round: only the first ``limit`` personalized test samples
    per (client, task). Clients that fail are reported as missing; the others are scored.
    """
    started = time.time()
    phase = "round check" if limit else "evaluation"
    if not limit:
        run.event("phase", name="evaluation", round=cfg["run.rounds"])
    active = [c for c in state.clients if c.node_id >= 0]
    tasks = _tasks(state.clients)
    train_table = _task_matrix(state.clients, tasks, len(state.centers))
    # The oracle serves a sample with the adapter of its true task: each global cluster's majority task.
    adapter_tasks = [tasks[int(row.argmax())] for row in train_table] if method.serving == "task" else []
    subset = {"limit": limit, "sets": ["personalized"]} if limit else {}
    messages = []
    for client in active:
        content = RecordDict(
            {
                "config": config_record(cfg, serving=method.serving, adapter_keys=sorted(state.shared), **subset),
                "adapter_tasks": ConfigRecord({"tasks": adapter_tasks}),
            }
            | {f"adapter.{key}": to_record(arrays, cfg["train.adapter_dtype"]) for key, arrays in state.shared.items()}
        )
        if method.serving in ("route", "task"):
            content["routing"] = to_record(
                {"global_centroids": state.centers, "local_to_global": client.assignment.astype(np.int64)}
            )
        messages.append(Message(content, client.node_id, records.EVALUATE, group_id="eval"))
    names = {c.node_id: f"client {c.client_id}" for c in active}
    replies, missing = _exchange(grid, messages, run, phase, cfg["run.reply_timeout_s"], names)
    per_client = {}
    for reply in replies:
        client = next(c for c in active if c.node_id == reply.metadata.src_node_id)
        who = f"client {client.client_id}"
        try:
            per_client[client.client_id] = get_metrics(reply.content, "metrics", who)
        except ReplyError as err:
            missing[who] = str(err)
            _reject(run, phase, who, str(err))
    if not per_client:
        raise RunError(f"{phase}: no client sent a valid reply")
    return {
        "evaluation": summarize_evaluation(per_client, train_table, tasks) | {"missing_clients": missing},
        "evaluation_s": time.time() - started,
        "eval_bytes_down": sum(record_bytes(*m.content.array_records.values()) for m in messages),
        "eval_tokens": int(sum(v.get("generated_tokens", 0) for v in per_client.values())),
        # per client: a checksum of its answers (``client.answers_digest``), to compare runs answer for answer
        "answers_crc32": {str(c): int(v.get("answers_crc32", 0)) for c, v in sorted(per_client.items())},
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
