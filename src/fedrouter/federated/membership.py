"""Which clients take part, and with which clusters: parse a client's clusters, refine them, place late clients,
match returning ones on resume. Every reply is validated before use (``records``)."""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedrouter.algorithm.metrics import NO_TASK, clustering_accuracy, matched_count
from fedrouter.config import Config
from fedrouter.errors import ReplyError
from fedrouter.federated import records
from fedrouter.federated.checkpoint import ServerState
from fedrouter.federated.records import check_array, check_name, config_record, get_arrays, get_metrics, record_bytes
from fedrouter.federated.transport import exchange, reject
from fedrouter.methods import ClientClusters, Method
from fedrouter.runlog import RunFolder


def parse_clusters(reply: Message, cfg: Config, method: Method, hidden: int | None) -> ClientClusters:
    """A client's clusters as it reported them, checked against the run's settings and the centroid width."""
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
    if method.embeds:
        centroids = check_array(clusters.get("centroids"), f"{who} centroids", shape=(None, hidden))
    else:
        centroids = np.zeros((1, 0), dtype=np.float32)  # one local cluster: all of the client's samples
    k = len(centroids)
    k_limit = max(method.local_k_limit(len(tasks)), 1)
    if not 1 <= k <= k_limit:
        raise ReplyError(f"{who}: sent {k} local clusters (expected 1..{k_limit})")
    counts = check_array(clusters.get("counts"), f"{who} counts", shape=(k,), kind="i")
    if (counts < 1).any() or (counts > records.MAX_METRIC).any():  # bounded: sums of counts cannot wrap around
        raise ReplyError(f"{who}: every local cluster must count at least one sample (and at most 1e15)")
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


def cluster_clients(
    grid: Grid, cfg: Config, run: RunFolder, method: Method, nodes: list[int], hidden: int | None, taken: set[int]
) -> tuple[list[ClientClusters], dict]:
    """Ask ``nodes`` to cluster their samples; the valid replies (sorted by client id) and the phase's figures.

    A reply is rejected when it is malformed or claims a client id in ``taken`` or already claimed.
    """
    messages = [Message(RecordDict({"config": config_record(cfg)}), n, records.CLUSTER, group_id="0") for n in nodes]
    replies, rejected = exchange(grid, messages, run, "clustering", cfg["run.reply_timeout_s"], {})
    clients: list[ClientClusters] = []
    figures = {"embed_s": 0.0, "local_cluster_s": 0.0, "bytes_up": 0, "model_loads": 0, "rejected": rejected}
    for reply in replies:
        who = f"node {reply.metadata.src_node_id}"
        figures["bytes_up"] += record_bytes(*reply.content.array_records.values())
        try:
            values = get_metrics(reply.content, "metrics", who)
            records.check_metric_keys(values, who, records.CLUSTER_METRICS)
            parsed = parse_clusters(reply, cfg, method, hidden)
            if values["num_samples"] != parsed.num_samples:
                raise ReplyError(f"{who}: reports {values['num_samples']:g} samples, its clusters {parsed.num_samples}")
            if parsed.client_id in taken:
                raise ReplyError(f"{who}: client id {parsed.client_id} is already taken by another node")
        except ReplyError as err:
            rejected[who] = str(err)
            reject(run, "clustering", who, str(err))
            continue
        taken.add(parsed.client_id)
        figures["embed_s"] += values.get("embed_s", 0.0)
        figures["local_cluster_s"] += values.get("cluster_s", 0.0)
        figures["model_loads"] = max(figures["model_loads"], int(values.get("model_loads", 0)))
        if method.embeds:
            hidden = parsed.centroids.shape[1]
        clients.append(parsed)
    return sorted(clients, key=lambda c: c.client_id), figures


def refine_clients(
    grid: Grid, cfg: Config, run: RunFolder, method: Method, clients: list[ClientClusters], centers: np.ndarray
) -> tuple[list[ClientClusters], int, int]:
    """Send ``centers`` to every client, which splits the local clusters they tell apart
    (``Method.refine_samples``); the clients' new clusters, and the bytes that went up and down.

    A client whose reply fails or does not check out takes no further part: its node may already hold the
    refined clusters, which the server then does not know.
    """
    content = {"global": records.to_record({"centroids": centers})}
    messages = [
        Message(RecordDict({"config": config_record(cfg)} | content), c.node_id, records.REFINE, group_id="0")
        for c in clients
    ]
    names = {c.node_id: f"client {c.client_id}" for c in clients}
    replies, _ = exchange(grid, messages, run, "refinement", cfg["run.reply_timeout_s"], names)
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
            new = parse_clusters(reply, cfg, method, hidden)
            if new.client_id != old.client_id:
                raise ReplyError(f"{who}: answered as client {new.client_id}")
        except ReplyError as err:
            reject(run, "refinement", who, str(err))
            continue
        new.silhouette = old.silhouette  # the search ran once, in the clustering phase
        refined.append(new)
    return refined, up, down


def replay_refinements(
    grid: Grid, cfg: Config, run: RunFolder, method: Method, state: ServerState, clients: list[ClientClusters]
) -> list[ClientClusters]:
    """Clients that cluster after the run's clustering phase (resumed, late) refine against the same global
    centroids, in the same order, as the first clients did, so a returning client finds its clusters again."""
    for centers in state.refinements:
        if not clients:
            break
        clients, _, _ = refine_clients(grid, cfg, run, method, clients, centers)
    return clients


def same_clusters(saved: ClientClusters, fresh: ClientClusters, cfg: Config) -> bool:
    """A returning client clustered as before (noisy centroids can only be compared by shape and counts)."""
    if saved.centroids.shape != fresh.centroids.shape or not (saved.counts == fresh.counts).all():
        return False
    return cfg["privacy.centroid_noise"] > 0 or bool(
        np.allclose(saved.centroids, fresh.centroids, rtol=1e-3, atol=1e-4)
    )


def admit(run: RunFolder, method: Method, state: ServerState, client: ClientClusters) -> None:
    """Place a client that arrived after the global clustering (``Method.join``); a global cluster it opens
    gets an adapter (``Method.add_global_cluster``)."""
    members = [c for c in state.clients if len(c.assignment)]
    before = len(state.centers)
    state.centers = method.join(members, state.centers, client)
    opened = list(range(before, len(state.centers)))
    for g in opened:
        method.add_global_cluster(state.shared, state.initial, g)
    state.clients.append(client)
    state.clients.sort(key=lambda c: c.client_id)
    run.event("joined", client=client.client_id, assignment=client.assignment.tolist(), new_clusters=opened)


def match_returning(run: RunFolder, method: Method, cfg: Config, state: ServerState, phase: str, fresh) -> None:
    """Clients that clustered again (a resume, or nodes that connected late): one of the checkpoint's comes
    back when its clusters are the saved ones, a new one is admitted, any other is refused."""
    saved = {c.client_id: c for c in state.clients}
    for client in fresh:
        old = saved.get(client.client_id)
        if old is None:
            admit(run, method, state, client)
        elif old.node_id < 0 and same_clusters(old, client, cfg):
            old.node_id = client.node_id
            if phase == "join":
                run.event("rejoined", client=client.client_id)
        else:
            reject(run, phase, f"client {client.client_id}", "its local clusters differ from the checkpoint's")
            state.refused.add(client.node_id)


def admit_late_clients(grid: Grid, cfg: Config, run: RunFolder, method: Method, state: ServerState) -> None:
    """Nodes that connected after the clustering: they cluster locally and join (``admit``)."""
    known = {c.node_id for c in state.clients} | state.refused
    room = cfg["data.num_clients"] - sum(c.node_id >= 0 for c in state.clients)
    new = [node for node in sorted(grid.get_node_ids()) if node not in known][: max(room, 0)]
    if not new:
        return
    hidden = state.centers.shape[1] if method.embeds else None
    active = {c.client_id for c in state.clients if c.node_id >= 0}
    clients, _ = cluster_clients(grid, cfg, run, method, new, hidden, set(active))
    clients = replay_refinements(grid, cfg, run, method, state, clients)
    state.refused |= set(new) - {c.node_id for c in clients}  # a rejected node takes no further part
    match_returning(run, method, cfg, state, "join", clients)
    refresh_clustering_summary(state, method)


def task_matrix(clients: list[ClientClusters], tasks: list[str], num: int) -> np.ndarray:
    """(global cluster x task) counts of training samples, from the clients' local histograms."""
    table = np.zeros((num, len(tasks)), dtype=np.int64)
    for client in clients:
        for local, g in enumerate(client.assignment):
            for j, task in enumerate(client.tasks):
                table[g, tasks.index(task)] += client.task_counts[local, j]
    return table


def tasks_of(clients: list[ClientClusters]) -> list[str]:
    return sorted({t for c in clients for t in c.tasks})


def refresh_clustering_summary(state: ServerState, method: Method) -> None:
    """The clustering summary recomputed for the clients known now (a resume, late clients). What only the
    first clustering knew (local k before the refinement) is kept, so the metrics equal an uninterrupted run's."""
    saved = state.metrics["clustering"]
    state.metrics["clustering"] = saved | clustering_summary(state, method, saved.get("silhouette_global", {}))


def clustering_summary(state: ServerState, method: Method, global_scores: dict) -> dict:
    """Local and global k, clustering accuracy (from the clients' label counts), the cluster map."""
    clients = state.clients
    tasks = tasks_of(clients)
    table = task_matrix(clients, tasks, len(state.centers))
    labelled = any(task != NO_TASK for task in tasks)
    scored = labelled and method.embeds
    local_matched = sum(matched_count(c.task_counts) for c in clients)
    return {
        "local_k": {c.client_id: len(c.centroids) for c in clients},
        "global_k": len(state.centers),
        "task_labels": labelled,
        "cluster_acc_local": local_matched / sum(c.num_samples for c in clients) if scored else None,
        "cluster_acc_global": clustering_accuracy(table) if scored else None,
        "global_cluster_tasks": {
            g: {tasks[j]: int(table[g, j]) for j in range(len(tasks)) if table[g, j]} for g in range(len(table))
        },
        "silhouette_local": {c.client_id: c.silhouette for c in clients},
        "silhouette_global": global_scores,
        "cluster_map": {c.client_id: c.assignment.tolist() for c in clients},
    }
