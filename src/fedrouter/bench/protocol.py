"""The benchmark's profiles: the settings of every run, which seeds run, its data and its results file; the
order in which a profile's runs are made."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

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


def plan(methods: Iterable[str], scenarios: Iterable[str], seeds: Iterable[int]) -> list[tuple]:
    """Runs in order: seed by seed through the paper4 scenarios, then the many-task run (the longest)."""
    methods, scenarios, seeds = list(methods), list(scenarios), list(seeds)
    paper4 = [s for s in scenarios if s != MANY_TASK]
    order = [(s, seed, m) for seed in seeds for s in paper4 for m in methods]
    return order + [(MANY_TASK, seed, m) for seed in seeds for m in methods if MANY_TASK in scenarios]
