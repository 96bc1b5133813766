"""Running a profile: every missing (scenario, seed, method) through the Flower app, records appended as each
run finishes; and the offline t-SNE of a run's clustering for the report's plot."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from fedrouter.bench.protocol import MANY_TASK, PROFILES, SCENARIOS, STANDARD, plan, results_path, run_settings
from fedrouter.bench.records import PeakMemory, append_records, check_one_commit, commit, read_records, records_from
from fedrouter.config import Config
from fedrouter.errors import ConfigError


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
