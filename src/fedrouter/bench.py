"""``fedrouter bench``: the standard benchmark ``paper4-raw-cpu`` (the benchmark's BENCHMARK.md), one command.

Every (scenario, seed, method) is one run of the same Flower app through ``run_experiment``; each finished run
appends its records (one per evaluation mode, and per routing mode for FedRouter) to a JSONL file, so an
interrupted benchmark resumes where it stopped and a crash never corrupts results already written. Tables and
plots are made from the JSONL alone (``fedrouter.bench_report``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedrouter.config import Config
from fedrouter.errors import ConfigError
from fedrouter.run_metrics import RunMetrics

SCENARIOS = ("single", "dual", "all")
MANY_TASK = "flan16-dual"
STANDARD = "paper4-raw-cpu"

# The setting `paper4-raw-cpu` (v2): every value of the benchmark's table (configs/paper4-raw-cpu.toml holds the
# same). One decoding budget for every test sample; nothing reads a test sample's task label but the scorer.
PAPER4_RAW_CPU = {
    "data.num_clients": 8,
    "data.train_per_client": 96,
    "data.test_per_task": 8,
    "data.test_per_task_overrides": "",
    "model.name": "smollm2",
    "model.precision": "fp32",
    "model.max_seq_len": 256,
    "lora.r": 8,
    "lora.alpha": 16.0,
    "lora.dropout": 0.05,
    "lora.target_modules": "q_proj,v_proj",
    "train.local_steps": 5,
    "train.batch_size": 8,
    "train.lr": 5e-4,
    # BENCHMARK.md gives one learning rate. A cosine decay would train the last round at a tenth of it, which
    # hurts round-robin methods most: the local clusters scheduled last would barely train.
    "train.lr_schedule": "constant",
    "run.rounds": 4,
    "eval.routing": "both",
    "eval.max_new_tokens": 48,
    "eval.round_samples": 0,  # no per-round check: the protocol costs ~20 CPU hours without it
}
# The many-task run (both profiles): 16 clients holding 2 of the 16 FLAN tasks each, one 32-token budget for all.
FLAN16_DUAL = {
    "data.num_clients": 16,
    "data.scenario": "dual",
    "data.train_per_client": 48,
    "eval.sets": "personalized",
    "eval.max_new_tokens": 32,
}
# Each run evaluates only what its table needs: Table 3 (generalization) from single, Table 1 from dual and all.
TABLE_SETS = {"single": "generalization", "dual": "personalized", "all": "personalized"}


@dataclass(frozen=True)
class Profile:
    """A benchmark profile: the settings of every run, which seeds run, its data and results file.

    ``retired``: why the profile no longer runs (its committed results stay, for ``--report-only``).
    """

    name: str
    settings: dict
    seeds: tuple[int, ...]
    data: str
    results: str
    eval_sets: dict = field(default_factory=dict)  # scenario -> eval.sets (empty: the settings' own)
    many_task: dict = field(default_factory=dict)
    retired: str = ""


PROFILES = {
    STANDARD: Profile(
        STANDARD,
        PAPER4_RAW_CPU,
        (0, 1, 2),
        data="paper4-raw",
        results="paper4-raw-cpu",
        eval_sets=TABLE_SETS,
        # Not in the protocol's table; run on request (--scenarios flan16-dual).
        many_task=FLAN16_DUAL,
    ),
    # A smoke-sized profile that fits in about 20 minutes on the 2-core CPU: 4 clients, a third of the data, 2
    # rounds of 1 step, 2 test samples per (client, task), answers up to 16 tokens, one seed. Its numbers are
    # noisy; the standard profile is the benchmark. The global cluster count is fixed at the 4 tasks: 4 clients
    # upload too few centroids for a search to be meaningful.
    "quick": Profile(
        "quick",
        PAPER4_RAW_CPU
        | {
            "data.num_clients": 4,
            "data.train_per_client": 32,
            "data.test_per_task": 2,
            "run.rounds": 2,
            "train.local_steps": 1,
            "eval.max_new_tokens": 16,
            "cluster.global_k": "4",
        },
        (0,),
        data="paper4-raw",
        results="paper4-raw-cpu-quick",
        eval_sets=TABLE_SETS,
    ),
    # v1, retired: it no longer runs. Its settings stay (less the per-task budget, a setting that is gone) for the
    # analysis scripts that cluster its paper4 splits (benchmarks/task_discovery.py, clustering_embeddings.py).
    "paper4-cpu": Profile(
        "paper4-cpu",
        PAPER4_RAW_CPU
        | {
            "data.test_per_task": 16,
            "data.test_per_task_overrides": "qqp=64",
            "model.precision": "auto",
            "train.local_steps": 4,
            "run.rounds": 3,
            "eval.sets": "personalized,generalization",
            "eval.round_samples": 2,
        },
        (0, 1),
        data="paper4",
        results="paper4-cpu",
        many_task=FLAN16_DUAL | {"data.test_per_task": 8, "data.test_per_task_overrides": ""},
        retired="its decoding budget read each test sample's task label (qqp: 4 tokens) and its prompts named the "
        "task; run the v2 profile paper4-raw-cpu",
    ),
}


def results_path(out: Path, profile: str) -> Path:
    return out / f"{PROFILES[profile].results}.jsonl"


def run_settings(profile: Profile, scenario: str, method: str, seed: int, data_root: Path) -> dict:
    """The settings of one benchmark run."""
    if scenario == MANY_TASK:
        settings = profile.settings | profile.many_task | {"data.source": str(data_root / "flan16")}
    else:
        settings = profile.settings | {"data.source": str(data_root / profile.data), "data.scenario": scenario}
        if scenario in profile.eval_sets:
            settings["eval.sets"] = profile.eval_sets[scenario]
    return settings | {"run.method": method, "run.seed": seed}


def check_one_commit(path: Path, records: list[dict], code: str, standard: bool) -> None:
    """Every record of a results file comes from one commit, and the standard one from a clean checkout of it."""
    others = sorted({r["commit"] for r in records} - {code})
    if others:
        raise ConfigError(
            f"{path}: its records come from commit {', '.join(others)}, this checkout is {code}; every record of a "
            f"results file comes from one commit: run from a checkout of {others[0].removesuffix('+changes')} "
            f"(git worktree add ../frozen {others[0].removesuffix('+changes')}), or write to another --out"
        )
    if standard and (code.endswith("+changes") or code == "unknown"):
        raise ConfigError(
            f"{path}: the standard benchmark runs from a clean checkout of one commit, and this one is {code} "
            "(tracked files differ from it): commit them, or run from a git worktree of a frozen commit"
        )


class PeakMemory:
    """Peak memory of this process plus its descendants (Ray's workers), sampled in a thread.

    ``peak`` sums resident set sizes (RSS): pages shared between processes (the torch libraries every Ray
    worker maps, Ray's shared object store) count once per process, so it overstates. ``peak_pss`` sums
    proportional set sizes (Linux): each shared page split between the processes sharing it, so it adds up
    to the RAM the run really holds. Reading PSS is slower, so it is sampled less often.
    """

    def __init__(self, interval: float = 0.25, pss_every: int = 4, include_self: bool = True) -> None:
        self.interval, self.pss_every, self.include_self = interval, pss_every, include_self
        self.peak = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self._stop.is_set():
            rss = pss = 0
            for proc in ([me] if self.include_self else []) + me.children(recursive=True):
                with contextlib.suppress(psutil.Error, AttributeError):
                    rss += proc.memory_info().rss
                    if tick % self.pss_every == 0:
                        pss += proc.memory_full_info().pss
            self.peak = max(self.peak, rss)
            self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> str:
    """CPU model, cores, whether the CPU computes bf16 natively, and GPU (if any) of this machine.

    Two hosts can share a CPU model name and differ in what decides the run time: an AMD EPYC with AVX-512 BF16
    trains about 3x faster than one without, where 'auto' precision falls back to fp32.
    """
    import torch

    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    bf16 = "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() else "no AVX-512 BF16"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu or platform.processor() or 'unknown CPU'}, {os.cpu_count()} cores, {bf16}, {gpu}"


def resolved_dtype(precision: str) -> str:
    """The compute dtype a run's ``model.precision`` resolves to on this machine (as its clients choose it)."""
    from fedrouter.model.loading import compute_dtype, default_device

    return str(compute_dtype(precision, default_device())).removeprefix("torch.")


def commit(results: Path | None = None) -> str:
    """The checkout's commit, with '+changes' when tracked files differ from it.

    ``results``: the folder the benchmark writes to; its own files (results already appended) are no change
    of the code.
    """
    with contextlib.suppress(OSError):
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if result.returncode == 0:
            status = ["git", "status", "--porcelain", "--untracked-files=no"]
            dirty = subprocess.run(
                [*status, "--", ".", f":(exclude){results}"] if results else status, capture_output=True
            )
            if dirty.returncode != 0:  # a results folder outside the repository: nothing to leave out
                dirty = subprocess.run(status, capture_output=True)
            return result.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
    return "unknown"


def records_from(
    metrics: RunMetrics,
    *,
    scenario: str,
    seed: int,
    profile: str,
    peak_rss_mb: float,
    peak_pss_mb: float | None = None,
    code: str = "",
) -> list[dict]:
    """One record per (evaluation mode[, routing mode]) of a finished run, with BENCHMARK.md's keys.

    ``code``: the commit the run used (read once when the benchmark starts; default: now).
    """
    from fedrouter.methods import method_class

    code = code or commit()
    where = machine()
    dtype = resolved_dtype(metrics["config"]["model.precision"])
    method = metrics["method"]
    clustering = metrics["clustering"]
    rounds = metrics["rounds"]
    out = []
    for key, summary in sorted(metrics["evaluation"]["by_set"].items()):
        eval_mode, mode = key.split("/")
        per_task = summary["per_task"]
        record = {
            "method": method,
            "scenario": scenario,
            "eval_mode": eval_mode,
            "seed": seed,
            "rouge1": summary["rouge1"],
            "rouge2": summary["rouge2"],
            "rougeL": summary["rougeL"],
            "rouge1_per_task": {task: scores["rouge1"] for task, scores in per_task.items()},
            "exact_match_qqp": per_task["qqp"]["exact_match"] if "qqp" in per_task else None,  # already 0-100
            "cluster_acc_local": clustering["cluster_acc_local"],
            "cluster_acc_global": clustering["cluster_acc_global"],
            "routing_acc": summary["routing_acc"],
            "wall_s": metrics["wall_s"],
            "round_s": [r["seconds"] for r in rounds],
            "bytes_up_per_round": [r["bytes_up"] for r in rounds],
            "bytes_down_per_round": [r["bytes_down"] for r in rounds],
            "peak_rss_mb": peak_rss_mb,
            "peak_pss_mb": peak_pss_mb,
            "commit": code,
            "machine": where,
            "compute_dtype": dtype,
            "profile": profile,
            # Beyond the required keys: the learning curve, clustering detail and phase times.
            "rouge1_per_round": [r.get("eval", {}).get(f"personalized/{mode}", {}).get("rouge1") for r in rounds],
            "train_loss_per_round": [r["train_loss"] for r in rounds],
            "local_k": clustering["local_k"],
            "global_k": clustering["global_k"],
            "silhouette_local": clustering["silhouette_local"],
            "silhouette_global": clustering["silhouette_global"],
            "clustering_s": metrics["phases"]["clustering_s"],
            "training_s": metrics["phases"]["training_s"],
            "evaluation_s": metrics.get("evaluation_s"),
            "num_test": int(sum(c["n"] for t in summary["per_client"].values() for c in t.values())),
            "config": metrics["config"],
        }
        if (routing := method_class(method).routing_label(mode)) is not None:
            record["routing"] = routing
        out.append(record)
    return out


def read_records(path: Path) -> list[dict]:
    """Records of a results file; a truncated last line (a crash mid-write) is reported, not half-read."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not a JSON record ({err.msg}); remove the line to go on") from None
    return records


def append_records(path: Path, records: Iterable[dict]) -> None:
    """Append whole lines and flush them to disk: a crash leaves earlier runs intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    with path.open("a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def plan(methods: Iterable[str], scenarios: Iterable[str], seeds: Iterable[int]) -> list[tuple]:
    """Runs in order: seed by seed through the paper4 scenarios, then the many-task run (the longest)."""
    methods, scenarios, seeds = list(methods), list(scenarios), list(seeds)
    paper4 = [s for s in scenarios if s != MANY_TASK]
    order = [(s, seed, m) for seed in seeds for s in paper4 for m in methods]
    return order + [(MANY_TASK, seed, m) for seed in seeds for m in methods if MANY_TASK in scenarios]


def run_bench(
    profile_name: str,
    *,
    out: Path,
    data_root: Path,
    runs_dir: Path,
    methods: Iterable[str] | None = None,
    scenarios: Iterable[str] = SCENARIOS,
    seeds: Iterable[int] | None = None,
    overrides: dict | None = None,
    log=print,
) -> Path:
    """Run every missing (scenario, seed, method) of a profile (``methods``: every registered one when None);
    returns the results file."""
    from fedrouter.methods import methods as registered
    from fedrouter.simulation import run_experiment

    methods = list(registered()) if methods is None else methods
    profile = PROFILES[profile_name]
    if profile.retired:
        raise ConfigError(f"profile {profile_name} is retired: {profile.retired}")
    path = results_path(out, profile_name)
    code = commit(out)  # the code every run of this call uses, even if the checkout changes meanwhile
    existing = read_records(path)
    check_one_commit(path, existing, code, standard=profile_name == STANDARD and not overrides)
    done = {(r["scenario"], r["seed"], r["method"]) for r in existing}
    todo = plan(methods, scenarios, profile.seeds if seeds is None else seeds)
    for scenario in {s for s, _, _ in todo}:
        if scenario not in (*SCENARIOS, MANY_TASK):
            raise ConfigError(f"--scenarios: unknown scenario {scenario!r} (expected {SCENARIOS} or {MANY_TASK})")
    for number, (scenario, seed, method) in enumerate(todo, 1):
        if (scenario, seed, method) in done:
            log(f"[{number}/{len(todo)}] {scenario} seed {seed} {method}: already in {path.name}")
            continue
        cfg = Config(run_settings(profile, scenario, method, seed, data_root) | (overrides or {}), where="benchmark")
        run_dir = runs_dir / profile_name / f"{scenario}-s{seed}-{method}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted attempt: its records were never written
        started = time.time()
        log(f"[{number}/{len(todo)}] {scenario} seed {seed} {method} ...")
        with PeakMemory() as memory:
            _, metrics = run_experiment(cfg, run_dir)
        records = records_from(
            metrics,
            scenario=scenario,
            seed=seed,
            profile=profile_name,
            peak_rss_mb=memory.peak / 2**20,
            peak_pss_mb=memory.peak_pss / 2**20,
            code=code,
        )
        if overrides:  # a variant of the protocol says so in every record
            records = [r | {"overrides": dict(sorted(overrides.items()))} for r in records]
        append_records(path, records)
        summary = ", ".join(f"{r['eval_mode'][:4]}/{r.get('routing', method)} {r['rouge1']:.1f}" for r in records)
        log(f"[{number}/{len(todo)}] {scenario} seed {seed} {method}: {time.time() - started:.0f}s, ROUGE-1 {summary}")
    return path


def tsne_points(profile_name: str, data_root: Path, scenario: str = "all", seed: int = 0) -> dict:
    """2-D t-SNE of every client's training-sample embeddings, with true tasks and FedRouter's global clusters.

    Recomputes the clustering of a FedRouter run offline with the same functions and settings (embeddings
    never leave clients in a run), so the plot shows exactly what the clients and the server computed.
    """
    import numpy as np
    from sklearn.manifold import TSNE

    from fedrouter import discovery
    from fedrouter.data import all_clients
    from fedrouter.model.loading import base_model

    cfg = Config(run_settings(PROFILES[profile_name], scenario, "fedrouter", seed, data_root), where="benchmark")
    base = base_model(cfg)
    clients = all_clients(cfg)
    embeddings = [discovery.embed(base, cfg, [s.instruction for s in client.train]) for client in clients]
    found = discovery.discover(cfg, embeddings)
    clusters = np.concatenate([found.sample_clusters(i) for i in range(len(clients))])
    tasks = [s.task for client in clients for s in client.train]
    xy = TSNE(n_components=2, random_state=seed, init="pca", perplexity=30).fit_transform(np.concatenate(embeddings))
    return {
        "scenario": scenario,
        "seed": seed,
        "xy": np.round(xy, 3).tolist(),
        "tasks": tasks,
        "clusters": [int(c) for c in clusters],
    }
