"""The ClientApp: local clustering, adapter training and evaluation on one client's data, for every method.

Each handler reads the run's method from the config (``fedrouter.methods``) and calls its hooks: how to group
the samples, which of the offered jobs to train and how, which adapter answers each test sample. Client state
that must survive between rounds (embeddings, local cluster labels and centroids, personal adapters) lives in
the node's ``context.state``; the base model and tokenized data live in per-process caches, so a process loads
the model once however many clients and rounds it serves.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrouter import discovery
from fedrouter.algorithm.clustering import cluster_means
from fedrouter.algorithm.privacy import private_centroids
from fedrouter.arrays import Arrays
from fedrouter.config import SETTINGS, Config
from fedrouter.data import ClientData, client_data, node_data
from fedrouter.errors import ConfigError
from fedrouter.federated import records, wire
from fedrouter.federated.answering import answer_tests, answers_digest, score
from fedrouter.federated.privacy import update_privacy_mod
from fedrouter.federated.records import (
    ReplyError,
    check_adapter,
    check_array,
    check_name,
    get_arrays,
    read_config,
    to_record,
)
from fedrouter.federated.training import train_jobs
from fedrouter.methods import Grouping, Method, Serving, make_method, part_of
from fedrouter.model import compute, loading, lora
from fedrouter.model.loading import BaseModel, base_model

app = ClientApp()


STATE_KEY = "fedrouter.local"
PERSONAL_KEY = "fedrouter.personal."
_DATA_KEYS = (*(key for key in SETTINGS if key.startswith("data.")), "eval.sets", "run.seed")
_data_cache: dict[tuple, ClientData] = {}
_encoded_cache: dict[tuple, list] = {}


def client_id(context: Context, cfg: Config) -> int:
    """This node's data partition: ``partition-id`` (simulation) or ``client-id`` (deployment node config).

    It must be one of the run's ``data.num_clients`` clients; in simulation, where Flower splits the data into
    ``num-partitions`` (one per SuperNode), the two numbers must agree (the server checks first, see
    ``transport.fit_to_federation``; this is the node's own check).
    """
    node = context.node_config
    key = "client-id" if "client-id" in node else "partition-id"
    value = node.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("node config needs an integer 'client-id' (or 'partition-id' in simulation)")
    clients, partitions = cfg["data.num_clients"], node.get("num-partitions")
    if key == "partition-id" and isinstance(partitions, int) and partitions != clients:
        raise ReplyError(
            f"this SuperNode holds partition {value} of {partitions} (node config 'num-partitions'), but setting "
            f"'data.num_clients' is {clients}: set data.num_clients = {partitions}, or 0 for one client per SuperNode"
        )
    if not 0 <= value < clients:
        raise ReplyError(
            f"this SuperNode is client {value} (node config '{key}'), beyond setting 'data.num_clients' = {clients} "
            f"(clients 0..{clients - 1}): it takes no part; raise data.num_clients or give the node a lower '{key}'"
        )
    return value


def my_data(cfg: Config, context: Context) -> ClientData:
    """This node's data: its own files (node config ``data-path``, a deployment) or its partition of
    ``data.source`` (simulation, or a deployment whose nodes share a copy of the data)."""
    cid = client_id(context, cfg)
    path = context.node_config.get("data-path")
    key = (cid, path, *(cfg[k] for k in _DATA_KEYS))
    if key not in _data_cache:
        _data_cache[key] = node_data(cfg, cid, str(path)) if path else client_data(cfg, cid)
    return _data_cache[key]


def _training_examples(cfg: Config, base: BaseModel, data: ClientData) -> list:
    key = (id(data), cfg["model.name"], cfg["model.max_seq_len"])  # ``data`` lives in _data_cache: ids are not reused
    if key not in _encoded_cache:
        pairs = [(s.prompt, s.response) for s in data.train]
        _encoded_cache[key] = compute.encode_training(base, pairs, cfg["model.max_seq_len"])
    return _encoded_cache[key]


def _received(message: Message, extra_keys: tuple[str, ...] = ()) -> tuple[Config, dict, Method]:
    """The server's config (validated again here) and the method it names, which this process must know."""
    cfg, extra = read_config(message.content["config"], extra_keys)
    try:
        return cfg, extra, make_method(cfg)
    except ConfigError as err:
        raise ReplyError(str(err)) from None


def _reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


def _local_state(context: Context, who: str) -> Arrays:
    if STATE_KEY not in context.state.array_records:
        raise ReplyError(f"{who}: no local clusters yet (the server must send '{records.CLUSTER}' first)")
    return records.from_record(context.state.array_records[STATE_KEY])


@app.query("cluster")
def cluster(message: Message, context: Context) -> Message:
    """Group the training samples as the method does (``Method.group_samples``) and upload what the server
    needs of the groups: centroids and counts (numbers only)."""
    cfg, _, method = _received(message)
    data = my_data(cfg, context)
    return _clusters_reply(message, context, cfg, data, method.group_samples(base_model(cfg), data))


@app.query("refine")
def refine(message: Message, context: Context) -> Message:
    """Split the local clusters that the server's global centroids tell apart (``Method.refine_samples``) and
    upload the clusters again, as ``cluster`` does."""
    cfg, _, method = _received(message)
    data = my_data(cfg, context)
    who = f"client {data.client_id}"
    if not method.refine_rounds():
        raise ReplyError(f"{who}: method {cfg['run.method']!r} has no clusters to refine")
    local = _local_state(context, who)
    embeddings = local["embeddings"]
    centers = get_arrays(message.content, "global", who).get("centroids")
    centers = check_array(centers, f"{who}: the server's global centroids", shape=(None, embeddings.shape[1]))
    started = time.perf_counter()
    labels = method.refine_samples(local, centers, f"{who}'s training samples")
    centroids = cluster_means(embeddings, labels).astype(np.float32)
    grouping = Grouping(labels, embeddings, centroids, cluster_s=time.perf_counter() - started)
    return _clusters_reply(message, context, cfg, data, grouping)


def _clusters_reply(message: Message, context: Context, cfg: Config, data: ClientData, grouping: Grouping) -> Message:
    """Keep the local clusters in the node's state and upload their centroids, counts and spreads."""
    labels, centroids = grouping.labels, grouping.centroids
    num_local = 1 if centroids is None else len(centroids)
    counts = np.bincount(labels, minlength=num_local).astype(np.int64)
    state = {"labels": labels}
    if centroids is not None:
        state |= {"embeddings": grouping.embeddings, "centroids": centroids}
    context.state.array_records[STATE_KEY] = to_record(state)
    # Evaluation-only metadata: how the true task labels fall into the local clusters (clustering accuracy).
    tasks = sorted({s.task for s in data.train}) if cfg["eval.report_labels"] else []
    task_counts = np.zeros((num_local, len(tasks)), dtype=np.int64)
    for label, sample in zip(labels, data.train, strict=True):
        if tasks:
            task_counts[label, tasks.index(sample.task)] += 1
    uploaded: Arrays = {"counts": counts}
    if centroids is not None:
        clip, noise = cfg["privacy.centroid_clip"], cfg["privacy.centroid_noise"]
        shared = private_centroids(grouping.embeddings, labels, num_local, clip, noise) if clip > 0 else centroids
        uploaded["centroids"] = shared  # the client keeps its exact centroids (state) for local routing
        if clip == 0:  # under privacy.* nothing exact leaves the client: the server goes without the spreads
            spreads = discovery.cluster_spreads(grouping.embeddings, labels, num_local)
            uploaded["spreads"] = spreads.astype(np.float32)
    scores = grouping.scores
    reply = {
        "clusters": to_record(uploaded),
        "labels": to_record({"task_counts": task_counts}),
        "info": ConfigRecord(
            {
                "client_id": data.client_id,
                "tasks": tasks,
                "silhouette_k": [int(k) for k in scores],
                "silhouette": [float(v) for v in scores.values()],
            }
        ),
        "metrics": MetricRecord(
            {
                "embed_s": grouping.embed_s,
                "cluster_s": grouping.cluster_s,
                "num_samples": len(data.train),
                "model_loads": loading.LOAD_COUNT,
            }
        ),
    }
    return _reply(message, **reply)


@app.query("initial")
def initial(message: Message, context: Context) -> Message:
    """The common starting adapter (LoRA init from ``run.seed``): the server needs one to know the shapes."""
    cfg, _ = read_config(message.content["config"])
    return _reply(message, initial_adapter=to_record(lora.fresh_adapter(base_model(cfg), cfg["run.seed"])))


def _personal(context: Context, name: str) -> Arrays | None:
    key = PERSONAL_KEY + name
    return records.from_record(context.state.array_records[key]) if key in context.state.array_records else None


@app.train(mods=[update_privacy_mod])
def train(message: Message, context: Context) -> Message:
    """Train the jobs the method takes of those offered; keep personal adapters here, send shared parts back."""
    cfg, extra, method = _received(message, ("round", "lr"))
    data = my_data(cfg, context)
    base = base_model(cfg)
    who = f"client {data.client_id}"
    labels = _local_state(context, who)["labels"]
    jobs = wire.read_jobs(message.content, int(labels.max()) + 1, who)
    shapes = lora.adapter_shapes(base)
    received = {
        job.name: check_adapter(
            get_arrays(message.content, wire.adapter_key(job.name), "server"),
            {key: shapes[key] for key in part_of(shapes, job.part)},
            f"server adapter {job.name}",
        )
        for job in jobs
        if job.shared is not None and job.part != "none"
    }
    personal = {job.personal: p for job in jobs if job.personal and (p := _personal(context, job.personal)) is not None}
    started = time.perf_counter()
    examples = _training_examples(cfg, base, data)
    round_index, lr = int(extra["round"]), float(extra["lr"])
    uploads, metrics = train_jobs(
        method, base, cfg, data.client_id, examples, labels, jobs, received, personal, round_index, lr
    )
    for name, arrays in personal.items():
        context.state.array_records[PERSONAL_KEY + name] = to_record(arrays)
    metrics["train_s"] = time.perf_counter() - started
    metrics["model_loads"] = loading.LOAD_COUNT
    out = {wire.adapter_key(name): to_record(arrays, cfg["train.adapter_dtype"]) for name, arrays in uploads.items()}
    return _reply(message, metrics=MetricRecord(metrics), **out)


def _test_subset(tests: dict[str, list], sets: object, limit: object, who: str) -> dict[str, list]:
    """The test sets to score: all, or (a round check) the first ``limit`` samples per task of some sets."""
    if not limit:
        return tests
    if not isinstance(limit, int) or limit < 0 or not isinstance(sets, list) or not set(sets) <= set(tests):
        raise ReplyError(f"{who}: bad test subset (limit {limit!r}, sets {sets!r})")
    subset: dict[str, list] = {}
    for name in sets:
        seen: dict[str, int] = {}
        subset[name] = []
        for sample in tests[name]:
            seen[sample.task] = seen.get(sample.task, 0) + 1
            if seen[sample.task] <= limit:
                subset[name].append(sample)
    return subset


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Pick an adapter per test sample (``Method.serve``), generate per adapter, score per task."""
    cfg, extra, method = _received(message, ("adapter_keys", "limit", "sets"))
    data = my_data(cfg, context)
    base = base_model(cfg)
    who = f"client {data.client_id}"
    local = _local_state(context, who)
    shapes = lora.adapter_shapes(base)
    reference = {key: shapes[key] for key in part_of(shapes, method.shared_part)}
    keys = [check_name(k, f"{who} adapter key") for k in extra["adapter_keys"]]
    shared = {
        key: check_adapter(
            get_arrays(message.content, wire.adapter_key(key), "server"), reference, f"server adapter {key}"
        )
        for key in keys
    }
    personal = _personal(context, "local")
    if personal is None and method.personal_state:
        personal = lora.fresh_adapter(base, cfg["run.seed"])  # no training round ran
    serving = Serving(
        base,
        cfg,
        data.client_id,
        shared,
        personal,
        local,
        [s.prompt for s in data.train],
        method.read_serving(message.content, keys, local, who),
        lambda: _training_examples(cfg, base, data),
    )
    started = time.perf_counter()
    tests = _test_subset(data.tests, extra.get("sets"), extra.get("limit", 0), who)
    answered, generated_tokens = answer_tests(method, serving, tests, method.modes(cfg))
    fallback = method.routes and cfg["routing.fallback"] != "none"
    metrics = score(tests, answered, count_routes=method.routes, count_fallbacks=fallback)
    metrics["answers_crc32"] = answers_digest(tests, answered)
    metrics["eval_s"] = time.perf_counter() - started
    metrics["model_loads"] = loading.LOAD_COUNT
    metrics["generated_tokens"] = generated_tokens
    return _reply(message, metrics=MetricRecord(metrics))


__all__ = ["app"]
