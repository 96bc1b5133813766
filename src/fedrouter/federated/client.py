"""The ClientApp: local clustering, adapter training and evaluation on one client's data, for every method.

What to train comes as a list of jobs (``fedrouter.methods.Job``); which adapter answers a test sample comes
as the method's serving rule. Client state that must survive between rounds (embeddings, local cluster labels
and centroids, personal adapters) lives in the node's ``context.state``; the base model and tokenized data
live in per-process caches, so a process loads the model once however many clients and rounds it serves.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrouter import discovery
from fedrouter.algorithm.clustering import cluster_means
from fedrouter.algorithm.metrics import exact_match, rouge
from fedrouter.algorithm.routing import route
from fedrouter.config import Config
from fedrouter.data import ClientData, Sample, client_data, node_data
from fedrouter.federated import records
from fedrouter.federated.records import (
    Arrays,
    ReplyError,
    check_adapter,
    check_array,
    check_name,
    get_arrays,
    read_config,
    to_record,
)
from fedrouter.methods import METHODS, PARTS, SERVINGS, Job, part_of
from fedrouter.methods.feddpa import INSTANCES, MAX_WEIGHT, WEIGHT_STEP
from fedrouter.model import compute, loading, lora
from fedrouter.model.loading import BaseModel, shared_base_model
from fedrouter.privacy import private_centroids, update_privacy_mod

app = ClientApp()


STATE_KEY = "fedrouter.local"
PERSONAL_KEY = "fedrouter.personal."
_DATA_KEYS = (
    "data.source", "data.num_clients", "data.scenario", "data.train_per_client", "data.test_per_task",
    "data.test_per_task_overrides", "data.tasks", "data.synthetic_size", "eval.sets", "run.seed",
)  # fmt: skip
_data_cache: dict[tuple, ClientData] = {}
_encoded_cache: dict[tuple, list] = {}


def base_model(cfg: Config) -> BaseModel:
    lora_key = (cfg["lora.r"], cfg["lora.alpha"], cfg["lora.dropout"], tuple(cfg.list("lora.target_modules")))
    # A client given part of the cores (run.client_cpus) uses that many threads, so parallel clients do not
    # oversubscribe them.
    threads = cfg["model.threads"]
    if not threads and cfg["run.client_cpus"]:
        threads = max(1, int(cfg["run.client_cpus"]))
    return shared_base_model(
        cfg["model.name"],
        cfg["model.precision"],
        lora_key,
        threads,
        cfg["model.quantization"],
        cfg["model.gradient_checkpointing"],
    )


def client_id(context: Context, cfg: Config) -> int:
    """This node's data partition: ``partition-id`` (simulation) or ``client-id`` (deployment node config)."""
    node = context.node_config
    value = node.get("client-id", node.get("partition-id"))
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("node config needs an integer 'client-id' (or 'partition-id' in simulation)")
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
    """Embed the training samples, cluster them locally, upload centroids and counts (numbers only).

    Methods without clustering skip the embedding: one local cluster holds every sample. The oracle's local
    clusters are the true tasks.
    """
    cfg, _ = read_config(message.content["config"])
    data = my_data(cfg, context)
    base = base_model(cfg)
    clustering = METHODS[cfg["run.method"]].clustering
    held = sorted({s.task for s in data.train})
    embed_s = cluster_s = 0.0
    scores: dict[int, float] = {}
    state: Arrays = {}
    if clustering == "none":
        labels = np.zeros(len(data.train), dtype=np.int64)
        centroids = None
    else:
        started = time.perf_counter()
        embeddings = discovery.embed(base, cfg, [s.instruction for s in data.train])
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        if clustering == "task":
            labels = np.array([held.index(s.task) for s in data.train], dtype=np.int64)
            centroids = np.stack([embeddings[labels == i].mean(0) for i in range(len(held))]).astype(np.float32)
        else:
            fitted = discovery.cluster_samples(
                cfg, embeddings, f"client {data.client_id}'s {len(embeddings)} training samples"
            )
            labels, centroids, scores = fitted.labels_, fitted.centers_.astype(np.float32), fitted.scores_
        cluster_s = time.perf_counter() - started
        state = {"embeddings": embeddings, "centroids": centroids}
    return _clusters_reply(message, context, cfg, data, state, labels, scores, embed_s=embed_s, cluster_s=cluster_s)


@app.query("refine")
def refine(message: Message, context: Context) -> Message:
    """Split the local clusters that the server's global centroids tell apart (``discovery.refine_samples``)
    and upload the clusters again, as ``cluster`` does. Only embedding clusters are refined."""
    cfg, _ = read_config(message.content["config"])
    data = my_data(cfg, context)
    who = f"client {data.client_id}"
    if METHODS[cfg["run.method"]].clustering != "kmeans":
        raise ReplyError(f"{who}: method {cfg['run.method']!r} has no embedding clusters to refine")
    local = _local_state(context, who)
    embeddings = local["embeddings"]
    centers = get_arrays(message.content, "global", who).get("centroids")
    centers = check_array(centers, f"{who}: the server's global centroids", shape=(None, embeddings.shape[1]))
    started = time.perf_counter()
    labels = discovery.refine_samples(cfg, embeddings, local["labels"], centers, f"{who}'s training samples")
    centroids = cluster_means(embeddings, labels).astype(np.float32)
    state = {"embeddings": embeddings, "centroids": centroids}
    return _clusters_reply(message, context, cfg, data, state, labels, {}, cluster_s=time.perf_counter() - started)


def _clusters_reply(
    message: Message,
    context: Context,
    cfg: Config,
    data: ClientData,
    state: Arrays,
    labels: np.ndarray,
    scores: dict[int, float],
    *,
    embed_s: float = 0.0,
    cluster_s: float = 0.0,
) -> Message:
    """Keep the local clusters in the node's state and upload their centroids, counts and spreads."""
    centroids = state.get("centroids")
    num_local = 1 if centroids is None else len(centroids)
    counts = np.bincount(labels, minlength=num_local).astype(np.int64)
    context.state.array_records[STATE_KEY] = to_record(state | {"labels": labels})
    # Evaluation-only metadata: how the true task labels fall into the local clusters (clustering accuracy).
    held = sorted({s.task for s in data.train})
    tasks = held if cfg["eval.report_labels"] else []
    task_counts = np.zeros((num_local, len(tasks)), dtype=np.int64)
    for label, sample in zip(labels, data.train, strict=True):
        if tasks:
            task_counts[label, tasks.index(sample.task)] += 1
    uploaded: Arrays = {"counts": counts}
    if centroids is not None:
        clip, noise = cfg["privacy.centroid_clip"], cfg["privacy.centroid_noise"]
        shared = private_centroids(state["embeddings"], labels, num_local, clip, noise) if clip > 0 else centroids
        uploaded["centroids"] = shared  # the client keeps its exact centroids (state) for local routing
        if clip == 0:  # under privacy.* nothing exact leaves the client: the server goes without the spreads
            spreads = discovery.cluster_spreads(state["embeddings"], labels, num_local)
            uploaded["spreads"] = spreads.astype(np.float32)
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
                "embed_s": embed_s,
                "cluster_s": cluster_s,
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


def _seed(*parts: int) -> int:
    return zlib.crc32(",".join(map(str, parts)).encode())


def _read_jobs(message: Message, num_local: int, who: str) -> list[Job]:
    if "jobs" not in message.content.config_records:
        raise ReplyError(f"{who}: the server sent no 'jobs'")
    record = message.content.config_records["jobs"]
    columns = [record.get(key, []) for key in ("names", "shared", "local_cluster", "personal", "part", "partner")]
    if len({len(c) for c in columns}) != 1 or not isinstance(columns[0], list):
        raise ReplyError(f"{who}: malformed job list from the server")
    jobs = []
    for name, shared, local, personal, part, partner in zip(*columns, strict=True):
        if not isinstance(local, int) or not -1 <= local < num_local:
            raise ReplyError(f"{who}: asked to train unknown local cluster {local!r}")
        if part not in PARTS:
            raise ReplyError(f"{who}: unknown adapter part {part!r} (expected one of {PARTS})")
        for value in (shared, personal, partner):
            if value:
                check_name(value, f"{who} job field")
        jobs.append(
            Job(
                name=check_name(name, f"{who} job name"),
                shared=shared or None,
                local_cluster=None if local < 0 else local,
                personal=personal or None,
                part=part,
                partner=partner or None,
            )
        )
    return jobs


def _personal(context: Context, name: str) -> Arrays | None:
    key = PERSONAL_KEY + name
    return records.from_record(context.state.array_records[key]) if key in context.state.array_records else None


def train_jobs(
    base: BaseModel,
    cfg: Config,
    client: int,
    examples: list,
    labels: np.ndarray,
    jobs: list[Job],
    received: dict[str, Arrays],
    personal: dict[str, Arrays],
    round_index: int,
    lr: float,
) -> tuple[dict[str, Arrays], dict[str, float]]:
    """Run a round's jobs on one client: returns what to upload (job name -> arrays) and metrics.

    A job starts from its personal adapter (or the common fresh start), overlaid with the weights the server
    sent (``received``, already validated); personal adapters are updated in ``personal``.
    """
    uploads: dict[str, Arrays] = {}
    metrics: dict[str, float] = {}
    trained: dict[str, Arrays] = {}
    for job in jobs:
        weights = personal.get(job.personal) if job.personal else None
        if weights is None:
            weights = lora.fresh_adapter(base, cfg["run.seed"])  # the same start the server's adapters have
        weights = weights | received.get(job.name, {})
        partner = None
        if job.partner:  # trained earlier this round, else personal, else as the server sent it
            partner = trained.get(job.partner) or personal.get(job.partner)
            if partner is None and job.partner in received:
                partner = lora.fresh_adapter(base, cfg["run.seed"]) | received[job.partner]
        chosen = np.arange(len(examples)) if job.local_cluster is None else np.flatnonzero(labels == job.local_cluster)
        own = [examples[i] for i in chosen]
        seed = _seed(cfg["run.seed"], round_index, client, -1 if job.local_cluster is None else job.local_cluster)
        seed = _seed(seed, zlib.crc32(job.name.encode()))
        args = dict(steps=cfg["train.local_steps"], batch_size=cfg["train.batch_size"], lr=lr, seed=seed)
        lora.set_adapter(base, weights)
        if partner is None:
            losses = compute.train_adapter(base, own, **args)
        else:
            lora.set_adapter(base, partner, slot=lora.PARTNER)
            with lora.mixed(base, 0.5, 0.5):
                losses = compute.train_adapter(base, own, **args)
        trained[job.name] = lora.get_adapter(base)
        if job.personal:
            personal[job.personal] = trained[job.name]
        if job.shared is not None and job.part != "none":
            uploads[job.name] = part_of(trained[job.name], job.part)
        metrics[f"loss.{job.name}"] = float(np.mean(losses))
        metrics[f"num_samples.{job.name}"] = len(own)
    return uploads, metrics


@app.train(mods=[update_privacy_mod])
def train(message: Message, context: Context) -> Message:
    """Train each job's adapter on its samples; keep personal adapters here, send shared parts back."""
    cfg, extra = read_config(message.content["config"], ("round", "lr"))
    data = my_data(cfg, context)
    base = base_model(cfg)
    who = f"client {data.client_id}"
    state = _local_state(context, who)
    labels = state["labels"]
    jobs = _read_jobs(message, int(labels.max()) + 1, who)
    shapes = lora.adapter_shapes(base)
    received = {
        job.name: check_adapter(
            get_arrays(message.content, f"adapter.{job.name}", "server"),
            {key: shapes[key] for key in part_of(shapes, job.part)},
            f"server adapter {job.name}",
        )
        for job in jobs
        if job.shared is not None and job.part != "none"
    }
    personal = {job.personal: p for job in jobs if job.personal and (p := _personal(context, job.personal)) is not None}
    started = time.perf_counter()
    uploads, metrics = train_jobs(
        base,
        cfg,
        data.client_id,
        _training_examples(cfg, base, data),
        labels,
        jobs,
        received,
        personal,
        int(extra["round"]),
        float(extra["lr"]),
    )
    for name, arrays in personal.items():
        context.state.array_records[PERSONAL_KEY + name] = to_record(arrays)
    metrics["train_s"] = time.perf_counter() - started
    metrics["model_loads"] = loading.LOAD_COUNT
    out = {f"adapter.{name}": to_record(arrays, cfg["train.adapter_dtype"]) for name, arrays in uploads.items()}
    return _reply(message, metrics=MetricRecord(metrics), **out)


def _serve_keys(
    serving: str,
    mode: str,
    samples: list[Sample],
    emb: np.ndarray | None,
    routing: dict[str, np.ndarray],
    state: Arrays,
    tasks: list[str],
    weights: np.ndarray | None,
) -> list[tuple]:
    """Which adapter answers each sample: ("shared", key), ("personal",), ("overlay",), ("mix", weight), ("base",).

    Only the oracle reads a sample's task label (it is the oracle's definition); every other rule sees the input.
    """
    if serving == "route":
        routed = route(
            emb,
            mode=mode,
            global_centroids=routing["global_centroids"],
            local_centroids=state["centroids"],
            local_to_global=routing["local_to_global"],
        )
        return [("shared", str(int(g))) for g in routed]
    if serving == "task":
        nearest = route(emb, mode="global", global_centroids=routing["global_centroids"])
        return [
            ("shared", str(tasks.index(s.task) if s.task in tasks else int(g)))
            for s, g in zip(samples, nearest, strict=True)
        ]
    if serving == "shared":
        return [("shared", "global")] * len(samples)
    if serving == "mix":
        return [("mix", float(w)) for w in weights]
    return [(serving,)] * len(samples)


def _dpa_weights(
    base: BaseModel, cfg: Config, personal: Arrays, samples: list[Sample], train_inputs: list[str], client: int
) -> np.ndarray:
    """FedDPA's instance weight of the global adapter for each sample (see ``fedrouter.methods.feddpa``).

    0.5 x the mean cosine similarity of the sample's instance embedding to those of 5 training inputs drawn for
    it (a generator seeded by run seed and client: a sample's draw depends on its position, never on its task).
    """
    rng = np.random.default_rng(_seed(cfg["run.seed"], client))
    size = min(INSTANCES, len(train_inputs))
    picks = [rng.choice(len(train_inputs), size=size, replace=False) for _ in samples]
    needed = sorted({int(i) for pick in picks for i in pick})
    lora.set_adapter(base, personal)  # the authors embed with the local adapter loaded
    states = compute.last_token_states(
        base,
        [s.instruction for s in samples] + [train_inputs[i] for i in needed],
        batch_size=cfg["eval.batch_size"],
        max_len=cfg["model.max_seq_len"],
    )
    states /= np.maximum(np.linalg.norm(states, axis=1, keepdims=True), 1e-12)
    tests, references = states[: len(samples)], states[len(samples) :]
    row = {i: k for k, i in enumerate(needed)}
    similarity = np.array(
        [
            float((references[[row[int(i)] for i in pick]] @ test).mean())
            for test, pick in zip(tests, picks, strict=True)
        ]
    )
    return np.round(MAX_WEIGHT * similarity / WEIGHT_STEP) * WEIGHT_STEP


def _test_subset(tests: dict[str, list], sets: object, limit: object, who: str) -> dict[str, list]:
    """The test sets to score: all, or (a round check) the first ``limit`` samples per task of some sets."""
    if not limit:
        return tests
    if not isinstance(limit, int) or limit < 0 or not isinstance(sets, list) or not set(sets) <= set(tests):
        raise ReplyError(f"{who}: bad test subset (limit {limit!r}, sets {sets!r})")
    subset: dict[str, list] = {}
    for name in sets:
        seen: dict[str, int] = defaultdict(int)
        subset[name] = []
        for sample in tests[name]:
            seen[sample.task] += 1
            if seen[sample.task] <= limit:
                subset[name].append(sample)
    return subset


def answer_tests(
    base: BaseModel,
    cfg: Config,
    *,
    serving: str,
    modes: list[str],
    tests: dict[str, list[Sample]],
    shared: dict[str, Arrays],
    personal: Arrays | None,
    routing: dict[str, np.ndarray],
    state: Arrays,
    tasks: list[str],
    train_inputs: list[str],
    client: int,
) -> tuple[dict[tuple[str, str], list[tuple[tuple, str]]], int]:
    """Answer every test sample under a serving rule: (test set, mode) -> [(adapter key, answer)] per sample.

    Every sample gets the same decoding (greedy, ``eval.max_new_tokens``, stop at end of sequence) and the same
    prompt; which adapter answers it follows the serving rule from its input alone (the oracle excepted). Each
    (adapter, sample) answer is generated once, however many sets and modes need it. Returns the answers and
    the number of generated tokens.
    """
    samples = {s.id: s for test in tests.values() for s in test}
    index_of = {sample_id: i for i, sample_id in enumerate(samples)}
    ordered = list(samples.values())
    # The sets overlap (a client's own tasks are in both): each sample is embedded and weighted once.
    embedded = weights = None
    if serving in ("route", "task"):
        embedded = discovery.embed(base, cfg, [s.instruction for s in ordered])
    if serving == "mix":
        weights = _dpa_weights(base, cfg, personal, ordered, train_inputs, client)
    choices: dict[tuple[str, str], list[tuple]] = {}
    wanted: dict[tuple, set[int]] = defaultdict(set)
    for set_name, test in tests.items():
        rows = [index_of[s.id] for s in test]
        emb = embedded[rows] if embedded is not None else None
        for mode in modes:
            chosen = _serve_keys(
                serving, mode, test, emb, routing, state, tasks, weights[rows] if weights is not None else None
            )
            choices[(set_name, mode)] = chosen
            for row, key in zip(rows, chosen, strict=True):
                wanted[key].add(row)
    max_new = cfg["eval.max_new_tokens"]
    generate_args = dict(
        max_new_tokens=max_new, batch_size=cfg["eval.batch_size"], max_len=cfg["model.max_seq_len"] + max_new
    )
    answers: dict[tuple[tuple, int], str] = {}
    generated_tokens = 0
    for key in sorted(wanted):
        group = sorted(wanted[key])
        prompts = [ordered[i].instruction for i in group]
        if key[0] == "base":
            with base.model.disable_adapter():
                texts = compute.generate(base, prompts, **generate_args)
        elif key[0] == "mix":  # alpha * global + (1 - alpha) * local, as the authors weight them
            lora.set_adapter(base, shared["global"])
            lora.set_adapter(base, personal, slot=lora.PARTNER)
            with lora.mixed(base, key[1], 1.0 - key[1]):
                texts = compute.generate(base, prompts, **generate_args)
        else:
            if key[0] == "shared":
                lora.set_adapter(base, shared[key[1]])
            elif key[0] == "overlay":
                lora.set_adapter(base, personal | shared["global"])
            else:
                lora.set_adapter(base, personal)
            texts = compute.generate(base, prompts, **generate_args)
        for i, text in zip(group, texts, strict=True):
            answers[(key, i)] = text
            generated_tokens += len(base.tokenizer(text, add_special_tokens=False)["input_ids"])
    out = {
        (set_name, mode): [
            (key, answers[(key, index_of[s.id])]) for s, key in zip(tests[set_name], chosen, strict=True)
        ]
        for (set_name, mode), chosen in choices.items()
    }
    return out, generated_tokens


def answers_digest(tests: dict[str, list[Sample]], answered: dict[tuple[str, str], list[tuple[tuple, str]]]) -> int:
    """A CRC-32 of every (test set, mode, sample, adapter, answer): two runs answered alike exactly when their
    digests match, and no text leaves the client."""
    digest = 0
    for (set_name, mode), rows in sorted(answered.items()):
        for sample, (key, prediction) in zip(tests[set_name], rows, strict=True):
            digest = zlib.crc32(f"{set_name}\t{mode}\t{sample.id}\t{key}\t{prediction}\n".encode(), digest)
    return digest


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Pick an adapter per test sample (the method's serving rule), generate per adapter, score per task."""
    cfg, extra = read_config(message.content["config"], ("serving", "adapter_keys", "limit", "sets"))
    data = my_data(cfg, context)
    base = base_model(cfg)
    who = f"client {data.client_id}"
    state = _local_state(context, who)
    serving = extra["serving"]
    if serving not in SERVINGS or serving != METHODS[cfg["run.method"]].serving:
        raise ReplyError(f"{who}: serving rule {serving!r} does not belong to method {cfg['run.method']!r}")
    shapes = lora.adapter_shapes(base)
    reference = {key: shapes[key] for key in part_of(shapes, "lora_A" if serving == "overlay" else "all")}
    keys = [check_name(k, f"{who} adapter key") for k in extra["adapter_keys"]]
    shared = {
        key: check_adapter(get_arrays(message.content, f"adapter.{key}", "server"), reference, f"server adapter {key}")
        for key in keys
    }
    routing: dict[str, np.ndarray] = {}
    tasks: list[str] = []
    if serving in ("route", "task"):
        arrays = get_arrays(message.content, "routing", "server")
        routing["global_centroids"] = check_array(
            arrays.get("global_centroids"), "global centroids", shape=(len(keys), state["centroids"].shape[1])
        )
        routing["local_to_global"] = check_array(
            arrays.get("local_to_global"), "local-to-global map", shape=(len(state["centroids"]),), kind="i"
        )
        if ((routing["local_to_global"] < 0) | (routing["local_to_global"] >= len(keys))).any():
            raise ReplyError(f"{who}: local-to-global map points outside 0..{len(keys) - 1}")
        if sorted(keys) != sorted(str(g) for g in range(len(keys))):
            raise ReplyError(f"{who}: router adapters must be numbered 0..{len(keys) - 1}")
    if serving == "task":
        tasks = [check_name(t, f"{who} task") for t in message.content.config_records["adapter_tasks"]["tasks"]]
        if len(tasks) != len(keys):
            raise ReplyError(f"{who}: {len(tasks)} task names for {len(keys)} adapters")
    personal = _personal(context, "local")
    if personal is None and serving in ("personal", "overlay", "mix"):
        personal = lora.fresh_adapter(base, cfg["run.seed"])  # no training round ran
    modes = (
        (["local", "global"] if cfg["eval.routing"] == "both" else [cfg["eval.routing"]])
        if serving == "route"
        else [cfg["run.method"]]
    )
    started = time.perf_counter()
    tests = _test_subset(data.tests, extra.get("sets"), extra.get("limit", 0), who)
    answered, generated_tokens = answer_tests(
        base,
        cfg,
        serving=serving,
        modes=modes,
        tests=tests,
        shared=shared,
        personal=personal,
        routing=routing,
        state=state,
        tasks=tasks,
        train_inputs=[s.instruction for s in data.train],
        client=data.client_id,
    )
    metrics: dict[str, float] = {"answers_crc32": answers_digest(tests, answered)}
    for (set_name, mode), rows in answered.items():
        for sample, (key, prediction) in zip(tests[set_name], rows, strict=True):
            prefix = f"{set_name}.{mode}.{sample.task}"  # labels score answers: only here
            for name, value in rouge(prediction, sample.golds).items():
                metrics[f"{prefix}.{name}"] = metrics.get(f"{prefix}.{name}", 0.0) + value
            metrics[f"{prefix}.exact_match"] = metrics.get(f"{prefix}.exact_match", 0.0) + exact_match(
                prediction, sample.golds
            )
            metrics[f"{prefix}.n"] = metrics.get(f"{prefix}.n", 0) + 1
            if key[0] == "shared" and serving in ("route", "task"):
                metrics[f"{prefix}.route.{key[1]}"] = metrics.get(f"{prefix}.route.{key[1]}", 0) + 1
    metrics["eval_s"] = time.perf_counter() - started
    metrics["model_loads"] = loading.LOAD_COUNT
    metrics["generated_tokens"] = generated_tokens
    return _reply(message, metrics=MetricRecord(metrics))


__all__ = ["app"]
