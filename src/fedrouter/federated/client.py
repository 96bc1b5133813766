"""The FedRouter ClientApp: local clustering, adapter training and routed evaluation on one client's data.

Client state that must survive between rounds (embeddings, local cluster labels and centroids) lives in the
node's ``context.state``; the base model and tokenized data live in per-process caches, so a process loads
the model once however many clients and rounds it serves.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrouter.algorithm.clustering import local_clusters
from fedrouter.algorithm.metrics import exact_match, rouge
from fedrouter.algorithm.routing import route
from fedrouter.config import Config
from fedrouter.data import ClientData, client_data, max_new_tokens_for
from fedrouter.federated import records
from fedrouter.federated.records import (
    ReplyError,
    check_adapter,
    check_array,
    get_arrays,
    read_config,
    to_record,
)
from fedrouter.model import compute, loading, lora
from fedrouter.model.loading import BaseModel, shared_base_model

app = ClientApp()


STATE_KEY = "fedrouter.local"
_DATA_KEYS = (
    "data.source", "data.num_clients", "data.scenario", "data.train_per_client", "data.test_per_task",
    "data.test_per_task_overrides", "data.tasks", "data.synthetic_size", "eval.sets", "run.seed",
)  # fmt: skip
_data_cache: dict[tuple, ClientData] = {}
_encoded_cache: dict[tuple, list] = {}


def base_model(cfg: Config) -> BaseModel:
    lora_key = (cfg["lora.r"], cfg["lora.alpha"], cfg["lora.dropout"], tuple(cfg.list("lora.target_modules")))
    return shared_base_model(cfg["model.name"], cfg["model.precision"], lora_key, cfg["model.threads"])


def client_id(context: Context, cfg: Config) -> int:
    """This node's data partition: ``partition-id`` (simulation) or ``client-id`` (deployment node config)."""
    node = context.node_config
    value = node.get("client-id", node.get("partition-id"))
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("node config needs an integer 'client-id' (or 'partition-id' in simulation)")
    return value


def my_data(cfg: Config, context: Context) -> ClientData:
    cid = client_id(context, cfg)
    key = (cid, *(cfg[k] for k in _DATA_KEYS))
    if key not in _data_cache:
        _data_cache[key] = client_data(cfg, cid)
    return _data_cache[key]


def _training_examples(cfg: Config, base: BaseModel, data: ClientData) -> list:
    key = (data.client_id, *(cfg[k] for k in _DATA_KEYS), cfg["model.name"], cfg["model.max_seq_len"])
    if key not in _encoded_cache:
        pairs = [(s.instruction, s.response) for s in data.train]
        _encoded_cache[key] = compute.encode_training(base, pairs, cfg["model.max_seq_len"])
    return _encoded_cache[key]


def _reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


def _local_state(context: Context, who: str) -> dict[str, np.ndarray]:
    if STATE_KEY not in context.state.array_records:
        raise ReplyError(f"{who}: no local clusters yet (the server must send '{records.CLUSTER}' first)")
    return records.from_record(context.state.array_records[STATE_KEY])


@app.query("cluster")
def cluster(message: Message, context: Context) -> Message:
    """Embed the training samples, cluster them locally, upload centroids and counts (numbers only)."""
    cfg, extra = read_config(message.content["config"], ("initial_adapter_seed",))
    data = my_data(cfg, context)
    base = base_model(cfg)
    started = time.perf_counter()
    embeddings = compute.embed(
        base,
        [s.instruction for s in data.train],
        batch_size=cfg["model.embed_batch_size"],
        max_len=cfg["model.max_seq_len"],
    )
    embed_s = time.perf_counter() - started
    started = time.perf_counter()
    k = cfg["cluster.local_k"]
    fitted = local_clusters(
        embeddings,
        k=k if k == "auto" else int(k),
        k_max=cfg["cluster.local_k_max"],
        threshold=cfg["cluster.silhouette_threshold"],
        seed=cfg["run.seed"],
        what=f"client {data.client_id}'s {len(embeddings)} training samples",
    )
    cluster_s = time.perf_counter() - started
    counts = np.bincount(fitted.labels_, minlength=fitted.n_clusters_).astype(np.int64)
    context.state.array_records[STATE_KEY] = to_record(
        {"embeddings": embeddings, "labels": fitted.labels_, "centroids": fitted.centers_.astype(np.float32)}
    )
    # Evaluation-only metadata: how the true task labels fall into the local clusters (clustering accuracy).
    tasks = sorted({s.task for s in data.train}) if cfg["eval.report_labels"] else []
    task_counts = np.zeros((fitted.n_clusters_, len(tasks)), dtype=np.int64)
    for label, sample in zip(fitted.labels_, data.train, strict=True):
        if tasks:
            task_counts[label, tasks.index(sample.task)] += 1
    reply = {
        "clusters": to_record({"centroids": fitted.centers_.astype(np.float32), "counts": counts}),
        "labels": to_record({"task_counts": task_counts}),
        "info": ConfigRecord(
            {
                "client_id": data.client_id,
                "tasks": tasks,
                "silhouette_k": [int(k) for k in fitted.scores_],
                "silhouette": [float(v) for v in fitted.scores_.values()],
            }
        ),
        "metrics": MetricRecord(
            {
                "embed_s": embed_s,
                "cluster_s": cluster_s,
                "num_samples": len(data.train),
                "model_loads": loading.LOAD_COUNT,
            }
        ),
    }
    if "initial_adapter_seed" in extra:
        reply["initial_adapter"] = to_record(lora.fresh_adapter(base, int(extra["initial_adapter_seed"])))
    return _reply(message, **reply)


def _seed(*parts: int) -> int:
    return zlib.crc32(",".join(map(str, parts)).encode())


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the adapter of each scheduled local cluster on that cluster's samples only."""
    cfg, extra = read_config(message.content["config"], ("round", "lr", "local_clusters"))
    data = my_data(cfg, context)
    base = base_model(cfg)
    who = f"client {data.client_id}"
    state = _local_state(context, who)
    labels = state["labels"]
    examples = _training_examples(cfg, base, data)
    shapes = lora.adapter_shapes(base)
    lr, round_index = float(extra["lr"]), int(extra["round"])
    out_records: dict[str, ArrayRecord] = {}
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    for local in extra["local_clusters"]:
        if not 0 <= int(local) < len(state["centroids"]):
            raise ReplyError(f"{who}: asked to train unknown local cluster {local}")
        arrays = check_adapter(get_arrays(message.content, f"adapter.{local}", "server"), shapes, "server adapter")
        lora.set_adapter(base, arrays)
        own = [examples[i] for i in np.flatnonzero(labels == int(local))]
        losses = compute.train_adapter(
            base,
            own,
            steps=cfg["train.local_steps"],
            batch_size=cfg["train.batch_size"],
            lr=lr,
            seed=_seed(cfg["run.seed"], round_index, data.client_id, int(local)),
        )
        out_records[f"adapter.{local}"] = to_record(lora.get_adapter(base), cfg["train.adapter_dtype"])
        metrics[f"loss.{local}"] = float(np.mean(losses))
        metrics[f"num_samples.{local}"] = len(own)
    metrics["train_s"] = time.perf_counter() - started
    metrics["model_loads"] = loading.LOAD_COUNT
    return _reply(message, metrics=MetricRecord(metrics), **out_records)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Route every test sample (local and/or global mode), generate per adapter, score per task."""
    cfg, extra = read_config(message.content["config"], ("num_global",))
    data = my_data(cfg, context)
    base = base_model(cfg)
    who = f"client {data.client_id}"
    state = _local_state(context, who)
    num_global = int(extra["num_global"])
    routing = get_arrays(message.content, "routing", "server")
    centroids = check_array(routing.get("global_centroids"), "global centroids", shape=(num_global, base.hidden_size))
    local_to_global = check_array(
        routing.get("local_to_global"), "local-to-global map", shape=(len(state["centroids"]),), kind="i"
    )
    if ((local_to_global < 0) | (local_to_global >= num_global)).any():
        raise ReplyError(f"{who}: local-to-global map points outside 0..{num_global - 1}")
    shapes = lora.adapter_shapes(base)
    adapters = {
        g: check_adapter(get_arrays(message.content, f"adapter.{g}", "server"), shapes, f"server adapter {g}")
        for g in range(num_global)
    }
    modes = ["local", "global"] if cfg["eval.routing"] == "both" else [cfg["eval.routing"]]
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    # Which (adapter, sample) answers are needed over all sets and modes; each is generated once.
    routes: dict[tuple[str, str], np.ndarray] = {}
    wanted: dict[int, set[int]] = defaultdict(set)
    samples = {s.id: s for test in data.tests.values() for s in test}
    index_of = {sample_id: i for i, sample_id in enumerate(samples)}
    for set_name, test in data.tests.items():
        emb = compute.embed(
            base,
            [s.instruction for s in test],
            batch_size=cfg["model.embed_batch_size"],
            max_len=cfg["model.max_seq_len"],
        )
        for mode in modes:
            routed = route(
                emb,
                mode=mode,
                global_centroids=centroids,
                local_centroids=state["centroids"],
                local_to_global=local_to_global,
            )
            routes[(set_name, mode)] = routed
            for sample, g in zip(test, routed, strict=True):
                wanted[int(g)].add(index_of[sample.id])
    ordered = list(samples.values())
    answers: dict[tuple[int, int], str] = {}
    generated_tokens = 0
    for g in sorted(wanted):
        lora.set_adapter(base, adapters[g])
        by_length: dict[int, list[int]] = defaultdict(list)
        for i in sorted(wanted[g]):
            by_length[max_new_tokens_for(cfg, ordered[i].task)].append(i)
        for max_new, group in by_length.items():
            texts = compute.generate(
                base,
                [ordered[i].instruction for i in group],
                max_new_tokens=max_new,
                batch_size=cfg["eval.batch_size"],
                max_len=cfg["model.max_seq_len"] + max_new,
            )
            for i, text in zip(group, texts, strict=True):
                answers[(g, i)] = text
                generated_tokens += len(base.tokenizer(text, add_special_tokens=False)["input_ids"])
    for (set_name, mode), routed in routes.items():
        for sample, g in zip(data.tests[set_name], routed, strict=True):
            prediction = answers[(int(g), index_of[sample.id])]
            prefix = f"{set_name}.{mode}.{sample.task}"
            for key, value in rouge(prediction, sample.golds).items():
                metrics[f"{prefix}.{key}"] = metrics.get(f"{prefix}.{key}", 0.0) + value
            metrics[f"{prefix}.exact_match"] = metrics.get(f"{prefix}.exact_match", 0.0) + exact_match(
                prediction, sample.golds
            )
            metrics[f"{prefix}.n"] = metrics.get(f"{prefix}.n", 0) + 1
            metrics[f"{prefix}.route.{int(g)}"] = metrics.get(f"{prefix}.route.{int(g)}", 0) + 1
    metrics["eval_s"] = time.perf_counter() - started
    metrics["model_loads"] = loading.LOAD_COUNT
    metrics["generated_tokens"] = generated_tokens
    return _reply(message, metrics=MetricRecord(metrics))


__all__ = ["app"]
