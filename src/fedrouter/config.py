"""One run's settings: a flat table of dotted keys, read from TOML, the CLI or a Flower run config.

Every key has a type, a default and a check. The same table travels inside Flower messages (as a
``ConfigRecord``), so a client validates what the server sent exactly as the CLI validates what a user typed.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrouter.errors import ConfigError
from fedrouter.tracking import check_report_to


@dataclass(frozen=True)
class Setting:
    """One configurable value: its type, default, what it means and how it is checked."""

    type: type
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns a reason when the value is invalid


def _between(low: float, high: float, why: str = "") -> Callable[[Any], str | None]:
    reason = f" ({why})" if why else ""
    return lambda v: None if low <= v <= high else f"between {low} and {high}{reason}"


def _within(low: float, high: float, why: str) -> Callable[[Any], str | None]:
    """At least ``low`` and at most ``high``; ``why`` says why a larger value is nonsense or dangerous."""

    def check(v: Any) -> str | None:
        if v < low:
            return f"at least {low}"
        if v > high:
            return f"at most {high} ({why})"
        return None

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "one of " + ", ".join(repr(c) for c in choices)


# Upper bounds shared by several settings (each is far beyond any real run; beyond it a value is a typo).
MAX_CLIENTS = 10_000  # every client is a data partition held in memory (and a Ray actor while it works)
MAX_TOKENS = 131_072  # the longest context of current models (128k tokens)
MAX_K = 1024  # a K-Means fit per k tried, an adapter per global cluster
MAX_CORES = 1024  # more cores than any one machine has
MAX_TEST = 100_000  # every test sample is a generated answer
# Data limits (``data.max_*``), in the units users count in.
KIB, MIB, GIB = 1024, 1024**2, 1024**3
# routing.fallback_factor's default: the smallest factor of the measured grid that keeps at least 98% of trained-task
# prompts on their adapter in every task mix of paper4-raw, extra and flan16 (1.4 keeps 95% on one flan16 mix); it
# sends 0-83% of held-out-task prompts to the fallback, by mix (benchmarks/results/fallback-calibration.md).
FALLBACK_FACTOR = 1.5


def _k_setting(v: str) -> str | None:
    if v == "auto" or (v.isascii() and v.isdigit() and len(v) <= 6 and 1 <= int(v) <= MAX_K):
        return None
    return f"'auto' or a whole number of clusters from 1 to {MAX_K}"


def _gpus_setting(v: str) -> str | None:
    try:
        if v == "auto" or 0 <= float(v) <= 64:
            return None
    except ValueError:
        pass
    return "'auto' or a number of GPUs from 0 to 64 (fractions allowed: 0.5 puts two clients on one GPU)"


def _fallback_setting(v: str) -> str | None:
    if v in ("none", "base") or (v.isascii() and v.isdigit() and len(v) <= 6 and int(v) < MAX_K):
        return None
    return f"'none', 'base' or a global cluster's index (0 to {MAX_K - 1})"


def _non_empty(v: Any) -> str | None:
    return None if len(v) > 0 else "not empty"


SETTINGS: dict[str, Setting] = {
    # --- run ---
    "run.method": Setting(
        str,
        "fedrouter",
        "method: fedrouter, oracle (routes by true task label), local, fedit, feddpa, fedsa, ifca, zeroshot (the "
        "base model, no adapter), or one registered as a plugin (FEDROUTER_PLUGINS)",
    ),
    "run.seed": Setting(
        int,
        0,
        "seed for data split, clustering, initialisation and training",
        _within(0, 2**31 - 1, "numpy and scikit-learn take seeds below 2**32"),
    ),
    "run.rounds": Setting(
        int,
        3,
        "federated training rounds (0: cluster only)",
        _within(0, 10_000, "more than any run needs: the paper runs 25"),
    ),
    "run.output_dir": Setting(str, "runs", "folder under which each run writes its own run folder"),
    "run.name": Setting(str, "", "run folder name (default: time stamp and scenario)"),
    "run.resume": Setting(str, "", "a run folder to go on from (its checkpoint); empty: a new run"),
    "run.min_clients": Setting(
        int,
        0,
        "wait for this many clients (0: data.num_clients)",
        _within(0, MAX_CLIENTS, "the most clients data.num_clients allows"),
    ),
    "run.reply_timeout_s": Setting(
        float,
        3600.0,
        "seconds to wait for client replies per phase",
        _within(1, 7 * 86_400, "a week: a client silent for longer is gone"),
    ),
    "run.min_replies": Setting(
        int,
        1,
        "a phase counts only with this many valid client replies (a round below it keeps its adapters)",
        _within(1, MAX_CLIENTS, "the most clients data.num_clients allows"),
    ),
    "run.client_cpus": Setting(
        float,
        0.0,
        "CPU cores per simulated client (0: all of them, one client at a time); fewer lets clients train in parallel",
        _within(0, MAX_CORES, "more cores than any machine has"),
    ),
    "run.client_gpus": Setting(
        str,
        "auto",
        "GPUs per simulated client: 'auto' (1 where CUDA is, else 0) or a number; 0.25 puts four clients on a GPU",
        _gpus_setting,
    ),
    "run.report_to": Setting(
        str,
        "none",
        "experiment trackers that mirror the run's metrics: 'none' or any of tensorboard, mlflow, wandb "
        "(comma-separated; offline by default: RUN/tensorboard, <run.output_dir>/mlflow.db, RUN/wandb)",
        check_report_to,
    ),
    "run.ray_address": Setting(
        str,
        "",
        "an existing Ray cluster for the simulated clients ('auto' or the head's host:port); empty: Ray's own "
        "RAY_ADDRESS if set, else a Ray started on this machine for the run",
    ),
    # --- data ---
    "data.source": Setting(
        str,
        "synthetic",
        "'synthetic' (generated); a data file (.jsonl, .json, .csv, .parquet), a folder (train/test files, a "
        "`datasets` save_to_disk folder, or with data.partition = 'files' one file or folder per client); "
        "'hf:RECIPE' or 'hf:OWNER/NAME' (a hub dataset, needs internet)",
        _non_empty,
    ),
    "data.format": Setting(
        str,
        "auto",
        "how a row becomes a sample: 'plain' (prompt, response), 'alpaca' (instruction, input, output: input joined "
        "to the prompt), 'messages' (a chat: OpenAI messages or ShareGPT conversations), 'auto' (detected, and said)",
        _one_of("auto", "plain", "alpaca", "messages"),
    ),
    "data.columns.prompt": Setting(
        str, "", "column of the instruction / prompt (known names: instruction, prompt); empty: the known name"
    ),
    "data.columns.input": Setting(
        str,
        "",
        "column of alpaca: text joined to the prompt after a blank line (known names: input, context); empty: the known name",
    ),
    "data.columns.response": Setting(
        str,
        "",
        "column of the answer trained on and scored (known names: response, output, completion); empty: the known name",
    ),
    "data.columns.system": Setting(str, "", "column of a system prompt (known name: system); empty: the known name"),
    "data.columns.messages": Setting(
        str,
        "",
        "column of a chat: a list of {role, content} or {from, value} turns (known names: messages, conversations); empty: the known name",
    ),
    "data.columns.task": Setting(
        str,
        "",
        "column of the true task label, used only to split and to score (known names: task, category); empty: the known name",
    ),
    "data.columns.client": Setting(
        str,
        "",
        "column of which client a row belongs to (data.partition = 'column'; known name: client); empty: the known name",
    ),
    "data.columns.id": Setting(str, "", "column of a unique sample id (known name: id); empty: the known name"),
    "data.columns.references": Setting(
        str,
        "",
        "column of every gold answer: a list, or a JSON list in CSV (known name: references); empty: the known name",
    ),
    "data.ignore_columns": Setting(
        str, "", "comma-separated columns read by nothing, on purpose (any other unknown column is an error)"
    ),
    "data.partition": Setting(
        str,
        "scenario",
        "how samples are dealt to clients: 'scenario' (data.scenario), 'column' (one client per value of the "
        "client column, all its samples), 'dirichlet' (by task, Flower Datasets' DirichletPartitioner with "
        "data.dirichlet_alpha), 'files' (data.source is a folder holding one file or folder per client)",
        _one_of("scenario", "column", "dirichlet", "files"),
    ),
    "data.dirichlet_alpha": Setting(
        float,
        0.5,
        "data.partition = 'dirichlet': concentration (small: each client holds few tasks)",
        _within(1e-3, 1e6, "beyond it every client holds the same task mix: use data.scenario = 'iid'"),
    ),
    "data.num_clients": Setting(
        int,
        4,
        "number of clients (data partitions); 0: as many as the federation has, one per SuperNode (only under "
        "`flwr run`, where the server counts the SuperNodes; `fedrouter run` needs a number)",
        _within(0, MAX_CLIENTS, "each client is a data partition held in memory and a Ray actor"),
    ),
    "data.scenario": Setting(
        str, "dual", "data.partition = 'scenario': task split over clients", _one_of("single", "dual", "all", "iid")
    ),
    "data.train_per_client": Setting(
        int,
        48,
        "training samples per client (data.partition 'scenario'; the others give each client all of its own)",
        _within(1, 10_000_000, "more than a client can embed and train on"),
    ),
    "data.test_per_task": Setting(
        int, 4, "test samples per (client, task)", _within(1, MAX_TEST, "each test sample is a generated answer")
    ),
    "data.test_per_task_overrides": Setting(str, "", "per-task test counts, e.g. 'qqp=64,webnlg=16' (empty: none)"),
    "data.tasks": Setting(str, "", "comma-separated tasks to keep (empty: all tasks in the source)"),
    "data.unseen_tasks": Setting(
        str,
        "",
        "comma-separated tasks no client trains on; the generalization test set still asks them (how a router "
        "and its routing.fallback meet tasks it never saw)",
    ),
    "data.synthetic_size": Setting(
        int,
        240,
        "samples per task generated by the synthetic source",
        _within(8, 100_000, "generated in memory; a large dataset belongs in a file"),
    ),
    # Limits on what a data file may hold, checked as it is read (docs/data.md). The defaults hold real datasets:
    # instruction and chat sets (Alpaca 22 MB / 52k rows, Dolly 13 MB / 15k rows, ShareGPT ~0.7 GB / 94k chats,
    # SlimOrca 518k rows) have texts of at most tens of KB, long-document summarization (arXiv, GovReport, BookSum
    # chapters) of a few hundred KB. A text of 1 MiB is ~250k tokens, longer than any model.max_seq_len reads, so
    # one beyond it is a broken row (a whole document dumped into a field) rather than a long sample; it would cost
    # minutes and GBs in tokenization and evaluation before being cut to model.max_seq_len tokens anyway.
    "data.max_file_bytes": Setting(
        int,
        GIB,
        "largest data file read, in bytes (1073741824 = 1 GiB), checked before the file is opened: a file is read "
        "into memory whole (its text, rows and samples: several times its size), in every process that reads it",
        _within(KIB, 1024 * GIB, "more memory than any machine has"),
    ),
    "data.max_rows": Setting(
        int,
        1_000_000,
        "most rows of one data file (or saved split): more is an error naming the file; raise it, or split the file "
        "(rows are never dropped: cutting a file sorted by task would drop whole tasks)",
        _within(1, 1_000_000_000, "every row is a sample held in memory and embedded"),
    ),
    "data.max_sample_bytes": Setting(
        int,
        MIB,
        "longest text of a sample, in UTF-8 bytes (1048576 = 1 MiB), per field: a prompt, input, system prompt, "
        "answer, reference or chat turn (an id or client name too); data.on_too_long says what happens beyond. "
        "Token lengths are bounded apart from this: at tokenization every sample is shortened to "
        "model.max_seq_len tokens (a prompt keeps its start and end, an answer its start)",
        _within(KIB, GIB, "a text this long is never read whole: model.max_seq_len tokens are"),
    ),
    "data.on_too_long": Setting(
        str,
        "refuse",
        "a text longer than data.max_sample_bytes: 'refuse' (an error naming file, row and field) or 'truncate' "
        "(cut to that many bytes: a prompt, input, system prompt or user turn keeps its start and end around ' … ', "
        "as model.max_seq_len shortening does, an answer or reference its start; the count of samples cut is "
        "logged per file); ids and client names are never cut",
        _one_of("refuse", "truncate"),
    ),
    # --- model ---
    "model.name": Setting(
        str,
        "smollm2",
        "'smollm2' (embedded default), 'tiny-random' (tests), a Hugging Face id, a folder or a .gguf file",
        _non_empty,
    ),
    "model.precision": Setting(
        str,
        "auto",
        "'auto' (bf16 compute where the hardware has it), 'bf16' or 'fp32'",
        _one_of("auto", "bf16", "fp32"),
    ),
    "model.max_seq_len": Setting(
        int,
        256,
        "tokens per training sample (prompt + answer); longer samples are shortened to it",
        _within(16, MAX_TOKENS, "the longest context of current models"),
    ),
    "model.embed_batch_size": Setting(
        int, 32, "samples per embedding forward pass", _within(1, 4096, "one pass holds the whole batch in memory")
    ),
    "model.threads": Setting(
        int,
        0,
        "torch CPU threads (0: run.client_cpus where set, else the library default)",
        _within(0, MAX_CORES, "more cores than any machine has"),
    ),
    "model.quantization": Setting(
        str,
        "none",
        "frozen base weights in 'none', '8bit' or '4bit' (bitsandbytes; CUDA only: pip install 'fedrouter[gpu]')",
        _one_of("none", "8bit", "4bit"),
    ),
    "model.gradient_checkpointing": Setting(
        bool, False, "recompute activations in the backward pass: less memory for longer sequences, slower steps"
    ),
    # --- lora ---
    "lora.r": Setting(int, 8, "LoRA rank", _within(1, 1024, "a rank this high is no longer low-rank")),
    "lora.alpha": Setting(
        float, 16.0, "LoRA alpha", _within(0, 10_000, "the update is scaled by alpha / r: usually 1 to 4 x r")
    ),
    "lora.dropout": Setting(float, 0.05, "LoRA dropout", _between(0.0, 0.9)),
    "lora.target_modules": Setting(str, "q_proj,v_proj", "comma-separated module names to adapt", _non_empty),
    # --- train ---
    "train.local_steps": Setting(
        int,
        4,
        "optimizer steps per scheduled adapter per round",
        _within(1, 100_000, "one round would train for days"),
    ),
    "train.batch_size": Setting(
        int, 8, "samples per step", _within(1, 4096, "one step holds the whole batch in memory")
    ),
    "train.lr": Setting(float, 5e-4, "learning rate", _between(0.0, 1.0)),
    "train.lr_schedule": Setting(str, "cosine", "learning rate over rounds", _one_of("constant", "cosine")),
    "train.lr_min_ratio": Setting(float, 0.1, "cosine schedule's final lr / lr", _between(0.0, 1.0)),
    "train.schedule": Setting(
        str,
        "round-robin",
        "which local clusters a client trains per round",
        _one_of("round-robin", "all"),
    ),
    "train.adapter_dtype": Setting(str, "float32", "adapter precision on the wire", _one_of("float32", "float16")),
    # --- clustering ---
    "cluster.embedding": Setting(
        str,
        "prompt",
        "how a sample's input is embedded: 'prompt' (read as the prompt the model answers; an early layer's mean "
        "over its tokens and a middle layer's mean over its first and last cluster.edge_tokens, concatenated) or "
        "'text' (the raw text, one layer's mean: the paper's with embed_depth 1.0 and embed_scale 'none')",
        _one_of("prompt", "text"),
    ),
    "cluster.embed_depth": Setting(
        float,
        0.2,
        "which hidden layer's mean over the input's tokens embeds it, as a fraction of the model's layers (0.2: "
        "layer 6 of SmolLM2's 30; 1.0: the last layer, the paper's)",
        _between(0.0, 1.0),
    ),
    "cluster.edge_depth": Setting(
        float,
        0.6,
        "embedding 'prompt': the layer, as a fraction of the model's layers, pooled over the input's first and last "
        "tokens (0.6: layer 18 of 30)",
        _between(0.0, 1.0),
    ),
    "cluster.edge_tokens": Setting(
        int,
        32,
        "embedding 'prompt': how many of the input's first and last tokens the second part pools",
        _within(1, MAX_TOKENS, "the longest context of current models"),
    ),
    "cluster.embed_scale": Setting(
        str,
        "reference",
        "'reference': divide each embedding dimension by its spread over random token sequences (needs no data); "
        "'none': raw hidden states (the paper)",
        _one_of("reference", "none"),
    ),
    "cluster.local_k": Setting(str, "auto", "local clusters per client: 'auto' (silhouette) or a number", _k_setting),
    "cluster.local_k_max": Setting(
        int, 6, "largest k tried by the local silhouette search", _within(1, 256, "K-Means is fitted for every k")
    ),
    "cluster.local_space": Setting(
        str,
        "centred",
        "where a client's silhouette search runs: 'centred' (directions from the client's mean embedding) or "
        "'raw' (the embeddings, the paper)",
        _one_of("centred", "raw"),
    ),
    "cluster.local_threshold": Setting(
        float, 0.11, "below this best local silhouette, a client is single-task (k=1)", _between(-1.0, 1.0)
    ),
    "cluster.global_k": Setting(
        str, "auto", "global clusters: 'auto' (see cluster.global_method) or a number", _k_setting
    ),
    "cluster.global_method": Setting(
        str,
        "agglomerative",
        "how the server finds the global clusters when global_k = 'auto': 'agglomerative' (average linkage on the "
        "cosine distance of centred centroids, cut at cluster.global_threshold) or 'silhouette' (K-Means, k by "
        "silhouette up to cluster.global_k_max, metric cluster.global_metric)",
        _one_of("agglomerative", "silhouette"),
    ),
    "cluster.global_threshold": Setting(
        float, 0.4, "agglomerative: groups closer than this cosine distance merge", _between(0.01, 2.0)
    ),
    "cluster.global_k_max": Setting(
        int, 16, "largest k tried by the global silhouette search", _within(1, MAX_K, "K-Means is fitted for every k")
    ),
    "cluster.global_metric": Setting(
        str,
        "cosine",
        "how the silhouette search compares local centroids: 'cosine' (K-Means and silhouette on their directions; "
        "each global centroid stays the mean of its members) or 'euclidean' (the paper)",
        _one_of("euclidean", "cosine"),
    ),
    "cluster.silhouette_threshold": Setting(
        float,
        0.2,
        "global silhouette search: below this best silhouette, every client holds one task (one global cluster)",
        _between(-1.0, 1.0),
    ),
    "cluster.refine_rounds": Setting(
        int,
        1,
        "after the global clustering, rounds in which each client splits a local cluster whose samples lie nearest "
        "to different global centroids, and the server clusters again (0: one pass, the paper's)",
        _between(0, 5),
    ),
    "cluster.refine_share": Setting(
        float,
        0.3,
        "refinement: a local cluster splits only towards global centroids that are nearest to at least this share "
        "of its samples",
        _between(0.05, 0.5),
    ),
    "cluster.join_factor": Setting(
        float,
        1.5,
        "a client joining after global clustering opens a new global cluster when its centroid is farther than "
        "this factor x the widest global cluster's radius from every global centroid",
        _within(0, 1000, "1000 radii away already never opens one"),
    ),
    # --- aggregate (per global cluster; on updates = uploaded adapter minus the adapter sent that round) ---
    "aggregate.rule": Setting(
        str,
        "mean",
        "how each global cluster's updates combine: 'mean' (weighted by local cluster sample counts), 'median' "
        "(coordinate-wise, Flower's FedMedian), 'trimmed-mean' (Flower's, cutting aggregate.trim), 'krum' / "
        "'multi-krum' (Flower's selection, assuming aggregate.byzantine malicious clients, then the weighted mean)",
        _one_of("mean", "median", "trimmed-mean", "krum", "multi-krum"),
    ),
    "aggregate.trim": Setting(
        float,
        0.2,
        "trimmed-mean: fraction of the largest and of the smallest values cut per coordinate",
        _between(0.0, 0.49, "half or more would cut everything"),
    ),
    "aggregate.byzantine": Setting(
        int, 0, "krum / multi-krum: how many clients are assumed malicious", _within(0, MAX_CLIENTS, "clients")
    ),
    "aggregate.krum_select": Setting(
        int,
        0,
        "multi-krum: how many updates are selected and averaged (0: all but aggregate.byzantine)",
        _within(0, MAX_CLIENTS, "clients"),
    ),
    "aggregate.max_samples": Setting(
        int,
        0,
        "cap on the sample count (weight) of one update, on top of the count the client reported at clustering "
        "(0: no cap)",
        _within(0, 2**62, "int64"),
    ),
    "aggregate.norm_bound": Setting(
        float,
        0.0,
        "bound on each update's L2 norm, as a multiple of its global cluster's median update norm that round; needs "
        "a few updates per cluster (0: off)",
        _within(0, 1e6, "a bound a million times the median bounds nothing"),
    ),
    "aggregate.norm_action": Setting(
        str,
        "clip",
        "an update above aggregate.norm_bound: 'clip' (scaled down to the bound) or 'reject' (the reply is rejected)",
        _one_of("clip", "reject"),
    ),
    # --- privacy ---
    "privacy.centroid_clip": Setting(
        float,
        0.0,
        "clip each sample embedding to this L2 norm before uploaded centroids are averaged (0: off)",
        _within(0, 1e6, "larger than any embedding's norm: 0 turns clipping off"),
    ),
    "privacy.centroid_noise": Setting(
        float,
        0.0,
        "Gaussian noise on uploaded centroids: std = this x centroid_clip / cluster size (0: off)",
        _within(0, 10_000, "noise this large erases every centroid"),
    ),
    "privacy.update_clip": Setting(
        float,
        0.0,
        "Flower's LocalDpMod: clip each uploaded adapter update to this L2 norm and add noise (0: off)",
        _within(0, 1e6, "larger than any update's norm: 0 turns LocalDpMod off"),
    ),
    "privacy.update_epsilon": Setting(
        float,
        0.0,
        "LocalDpMod's privacy budget epsilon per round",
        _within(0, 1e6, "an epsilon this large protects nothing: privacy.update_clip = 0 turns LocalDpMod off"),
    ),
    "privacy.update_delta": Setting(float, 1e-5, "LocalDpMod's delta", _between(0.0, 1.0)),
    # --- evaluation ---
    "eval.sets": Setting(
        str,
        "personalized",
        "comma-separated test sets: personalized (own tasks), generalization (every task); 'none' skips evaluation",
        _non_empty,
    ),
    "eval.routing": Setting(str, "both", "router mode(s) to evaluate", _one_of("local", "global", "both")),
    # The fallback route (algorithm/routing.py): the same rule in evaluation, Router and fedrouter serve.
    "routing.fallback": Setting(
        str,
        "none",
        "where a prompt far from its cluster goes: 'none' (the nearest adapter, however far), 'base' (the base "
        "model) or a global cluster's index; far: beyond routing.fallback_factor x the cluster's radius",
        _fallback_setting,
    ),
    "routing.fallback_factor": Setting(
        float,
        FALLBACK_FACTOR,
        "how far from its cluster's centroid a prompt may lie before it falls back, in units of the cluster's "
        "radius (the RMS distance of its training samples to the centroid)",
        _within(0.1, 1000.0, "every prompt stays on its adapter long before that"),
    ),
    "eval.max_new_tokens": Setting(
        int,
        48,
        "longest generated answer, in tokens, the same for every test sample",
        _within(1, 32_768, "an answer this long is a runaway generation"),
    ),
    "eval.batch_size": Setting(
        int, 16, "prompts per generation batch", _within(1, 4096, "one batch holds every prompt in memory")
    ),
    "eval.round_samples": Setting(
        int,
        0,
        "after every round, score this many personalized test samples per (client, task) for a learning curve "
        "(0: only the final evaluation)",
        _within(0, MAX_TEST, "each test sample is a generated answer"),
    ),
    "eval.report_labels": Setting(
        bool,
        True,
        "clients also send how their training samples' task labels fall into their local clusters (counts only), "
        "for clustering and routing accuracy; false: centroids and counts only",
    ),
}

# Settings that no longer exist, and why: a config that still sets one gets this reason, not "unknown setting".
RETIRED = {
    "eval.max_new_tokens_overrides": "it gave each test sample a decoding budget read from its true task label, "
    "which tells a method how to answer; 'eval.max_new_tokens' now bounds every answer alike",
}

SECTIONS = sorted({key.split(".")[0] for key in SETTINGS})


def suggest(name: str, candidates: list[str]) -> str:
    """' (did you mean X?)' for the nearest candidate, or ''."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if not close:
        # A bare field name ("rounds") matches its dotted key ("run.rounds").
        close = [c for c in candidates if c.split(".")[-1] == name.split(".")[-1]][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, setting: Setting, where: str) -> Any:
    expected = setting.type
    if isinstance(value, str) and expected is not str:
        text = value.strip()
        try:
            if expected is bool:
                if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                value = text.lower() in ("true", "1", "yes")
            else:
                value = expected(text)
        except ValueError:
            raise ConfigError(
                f"{where}: setting '{key}' expects {expected.__name__}, got {_shown(value)}{_whole_hint(expected, text)}"
            ) from None
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: setting '{key}' must be a finite number, got {_shown(value)}") from None
    if expected is str and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # e.g. cluster.local_k = 3 in TOML
    if expected is str and isinstance(value, list):
        value = ",".join(str(v) for v in value)  # e.g. lora.target_modules = ["q_proj", "v_proj"]
    if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
        hint = _whole_hint(expected, value) if isinstance(value, float) else ""
        raise ConfigError(
            f"{where}: setting '{key}' expects {expected.__name__}, got {type(value).__name__} {_shown(value)}{hint}"
        )
    if expected is float and not math.isfinite(value):
        raise ConfigError(f"{where}: setting '{key}' must be a finite number, got {value!r}")
    if setting.check is not None and (reason := setting.check(value)):
        raise ConfigError(f"{where}: setting '{key}' must be {reason}, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut in the middle when long (one line, readable)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text)} characters)"


def _whole_hint(expected: type, value: Any) -> str:
    """Why a number such as '1e20' or 8.0 is not an int: whole numbers are written in digits."""
    if expected is not int:
        return ""
    try:
        float(value)
    except (TypeError, ValueError):
        return ""
    return " (a whole number is written in digits, without a decimal point or exponent)"


_methods_registered = False


def _register_methods() -> None:
    """Register the methods (built-in and plugins) once per process, before the first config is read."""
    global _methods_registered
    if not _methods_registered:
        _methods_registered = True
        from fedrouter.methods.registry import methods

        methods()


def add_settings(owner: str, settings: Mapping[str, Setting]) -> None:
    """Settings a method brings (``<method>.<name>``); the same definition registered again is no change."""
    for key, setting in settings.items():
        if not key.startswith(f"{owner}."):
            raise ValueError(f"method {owner!r}: its settings must be named '{owner}.<name>', got {key!r}")
        old = SETTINGS.get(key)
        if old is not None and (old.type, old.default, old.help) != (setting.type, setting.default, setting.help):
            raise ValueError(f"setting {key!r} is defined twice, differently")
        SETTINGS[key] = setting


class Config(Mapping[str, Any]):
    """A validated, complete set of settings (read-only mapping of dotted key -> value)."""

    def __init__(self, values: Mapping[str, Any] | None = None, *, where: str = "config") -> None:
        _register_methods()  # a method may bring settings of its own (``Method.settings``)
        merged = {key: s.default for key, s in SETTINGS.items()}
        for key, value in (values or {}).items():
            if key in RETIRED:
                raise ConfigError(f"{where}: setting '{key}' was removed: {RETIRED[key]}")
            if key not in SETTINGS:
                raise ConfigError(f"{where}: unknown setting '{key}'{suggest(key, list(SETTINGS))}")
            merged[key] = _coerce(key, value, SETTINGS[key], where)
        self._values = merged
        self._check_consistency(where)

    def _check_consistency(self, where: str) -> None:
        from fedrouter.methods.registry import method_class  # the methods read settings: imported when needed

        try:
            method = method_class(self["run.method"])
        except ConfigError as err:
            raise ConfigError(f"{where}: setting 'run.method': {err}") from None
        sets = self.list("eval.sets")
        if sets == ["none"]:
            sets = []
        for name in sets:
            if name not in ("personalized", "generalization"):
                raise ConfigError(
                    f"{where}: setting 'eval.sets' lists unknown test set {name!r}"
                    f"{suggest(name, ['personalized', 'generalization'])}; expected personalized, generalization"
                )
        self.task_overrides("data.test_per_task_overrides", where=where)
        if self["privacy.centroid_noise"] > 0 and self["privacy.centroid_clip"] <= 0:
            raise ConfigError(
                f"{where}: setting 'privacy.centroid_noise' needs 'privacy.centroid_clip' > 0 (the noise is scaled "
                "to the clipping norm)"
            )
        if self["privacy.update_clip"] > 0:
            if self["privacy.update_epsilon"] <= 0 or self["privacy.update_delta"] <= 0:
                raise ConfigError(
                    f"{where}: setting 'privacy.update_clip' needs 'privacy.update_epsilon' > 0 and "
                    "'privacy.update_delta' > 0"
                )
            if method.routes and self["train.schedule"] == "all":
                raise ConfigError(
                    f"{where}: setting 'privacy.update_clip' works on one uploaded adapter per round (Flower's "
                    "LocalDpMod); use 'train.schedule' = 'round-robin'"
                )
        if self["routing.fallback"] != "none":
            if not method.routes:
                raise ConfigError(
                    f"{where}: setting 'routing.fallback' applies to a router; run.method {self['run.method']!r} "
                    "routes nothing"
                )
            if self["privacy.centroid_clip"] > 0:
                raise ConfigError(
                    f"{where}: setting 'routing.fallback' needs the clusters' radii, which clients do not send "
                    "under 'privacy.centroid_clip' > 0"
                )
        if reason := method.check(self):
            raise ConfigError(f"{where}: {reason}")

    # Mapping protocol
    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({self._values!r})"

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed; keys use '__' for '.', e.g. ``run__rounds=2``."""
        values = dict(self._values)
        values.update({k.replace("__", "."): v for k, v in changes.items()})
        return Config(values)

    def list(self, key: str) -> list[str]:
        """A comma-separated setting as a list of stripped, non-empty items."""
        return [item.strip() for item in str(self[key]).split(",") if item.strip()]

    @property
    def eval_sets(self) -> list[str]:
        """The test sets to evaluate on ([] for 'none')."""
        sets = self.list("eval.sets")
        return [] if sets == ["none"] else sets

    def task_overrides(self, key: str, *, where: str = "config") -> dict[str, int]:
        """Parse 'task=number,task=number' settings."""
        result: dict[str, int] = {}
        for item in self.list(key):
            task, sep, number = (part.strip() for part in item.partition("="))
            whole = number.isascii() and number.isdigit() and len(number) <= 6
            if not sep or not task or not whole or not 1 <= int(number) <= MAX_TEST:
                raise ConfigError(
                    f"{where}: setting '{key}' expects 'task=number' items (number from 1 to {MAX_TEST}), got {item!r}"
                )
            result[task] = int(number)
        return result

    def cluster_k(self, key: str) -> int | str:
        """A ``cluster.*_k`` setting: 'auto' or the number of clusters it names."""
        value = self[key]
        return value if value == "auto" else int(value)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def to_toml(self) -> str:
        """The resolved config as TOML, one table per section (readable back with ``load_config``)."""
        lines: list[str] = []
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for key, value in self._values.items():
                if key.split(".")[0] == section:
                    lines.append(f"{key.split('.', 1)[1]} = {toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'run': {'rounds': 2}} -> {'run.rounds': 2}."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{full}."))
        else:
            flat[full] = value
    return flat


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's settings as dotted keys; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text: {err}") from None
    try:
        return flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: invalid TOML: {err}") from None


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['run.rounds=2', ...] -> {'run.rounds': '2'}; values are coerced later by ``Config``."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like KEY=VALUE, e.g. run.rounds=2")
        result[key.strip()] = value.strip()
    return result


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then a TOML file, then overrides (later wins)."""
    values: dict[str, Any] = {}
    if path is not None:
        file_values = read_toml(path)
        Config(file_values, where=f"config file {path}")  # validate with the file named
        values.update(file_values)
    if overrides:
        Config(overrides, where="command line")
        values.update(overrides)
    return Config(values)
