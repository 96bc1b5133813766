"""``fedrouter bench``: the standard benchmark ``paper4-raw-cpu`` (the benchmark's BENCHMARK.md), one command.

Every (scenario, seed, method) is one run of the same Flower app through ``run_experiment``; each finished run
appends its records (one per evaluation mode, and per routing mode for FedRouter) to a JSONL file, so an
interrupted benchmark resumes where it stopped and a crash never corrupts results already written. Tables and
plots are made from the JSONL alone.

- ``protocol``: the profiles (settings, seeds, data, results file) and the order of their runs;
- ``records``: the records and their provenance (commit, machine, peak memory), read and appended;
- ``run``: running a profile, and the offline t-SNE of a run's clustering;
- ``report``: tables and plots from the records (imports no model code).

The names below are the package's public interface.
"""

from fedrouter.bench.protocol import (
    FLAN16_DUAL,
    MANY_TASK,
    PAPER4_RAW_CPU,
    PROFILES,
    SCENARIOS,
    STANDARD,
    TABLE_SETS,
    Profile,
    plan,
    results_path,
    run_settings,
)
from fedrouter.bench.records import (
    PeakMemory,
    append_records,
    check_one_commit,
    commit,
    machine,
    read_records,
    records_from,
    resolved_dtype,
)
from fedrouter.bench.run import run_bench, tsne_points

__all__ = [
    "FLAN16_DUAL",
    "MANY_TASK",
    "PAPER4_RAW_CPU",
    "PROFILES",
    "SCENARIOS",
    "STANDARD",
    "TABLE_SETS",
    "PeakMemory",
    "Profile",
    "append_records",
    "check_one_commit",
    "commit",
    "machine",
    "plan",
    "read_records",
    "records_from",
    "resolved_dtype",
    "results_path",
    "run_bench",
    "run_settings",
    "tsne_points",
]
