"""Benchmark records: one JSON line per (method, scenario, evaluation mode, seed), with the provenance every
record carries (commit, machine, memory) and the rule that one results file comes from one commit."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from fedrouter.errors import ConfigError
from fedrouter.run_metrics import RunMetrics


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
