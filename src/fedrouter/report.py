"""What a person sees: live progress from a run's event stream, and the end-of-run summary tables."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedrouter.runlog import EVENTS, read_events


class ProgressFollower:
    """Follows ``events.jsonl`` in a thread and draws phase, round, client progress and time left."""

    def __init__(self, run_dir: Path, clients: int, rounds: int, console: Console) -> None:
        self.path = Path(run_dir) / EVENTS
        self._offset = self.path.stat().st_size if self.path.exists() else 0  # a resumed run: only new events
        self.console = console
        self.total = clients * (rounds + 2)  # clustering, each round, evaluation: one reply per client
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("replies"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("starting (loading data and model)", total=self.total)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> ProgressFollower:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        self.progress.stop()

    def _follow(self) -> None:
        while not self._stop.is_set():
            self._drain()
            time.sleep(0.3)

    def _drain(self) -> None:
        events, self._offset = read_events(self.path, self._offset)
        for event in events:
            self._show(event)

    def _show(self, event: dict) -> None:
        kind = event["event"]
        if kind == "phase":
            name = event["name"]
            label = f"round {event['round']}/{event['rounds']}: training" if name == "training" else name
            if name == "clustering":
                label = "embedding and local clustering"
            self.progress.update(self.task, description=label)
        elif kind == "reply" and event.get("phase") != "round check":  # the learning-curve check is not counted
            self.progress.advance(self.task)
        elif kind == "waiting":
            self.progress.update(self.task, description=f"waiting for clients ({event['connected']}/{event['wanted']})")
        elif kind == "clustered" and event.get("task_labels", True) is False:
            self.console.print(
                f"clustering: local k per client {event['local_k']}, {event['global_k']} global clusters "
                "(no task labels: no clustering accuracy)"
            )
        elif kind == "clustered" and event["global_k"] == 1 and event["cluster_acc_global"] is None:
            self.console.print("no clustering (the method trains per client or one shared adapter)")
        elif kind == "clustered":
            tasks = "; ".join(
                f"cluster {g}: " + ", ".join(f"{t} {n}" for t, n in mix.items())
                for g, mix in event["global_cluster_tasks"].items()
            )
            self.console.print(
                f"clustering: local k per client {event['local_k']}, {event['global_k']} global clusters "
                f"(accuracy local {_fraction(event['cluster_acc_local'])}, "
                f"global {_fraction(event['cluster_acc_global'])})"
            )
            self.console.print(f"  global clusters by true task: {tasks}")
        elif kind == "round":
            losses = ", ".join(f"{g}: {v:.3f}" for g, v in event["train_loss"].items())
            self.console.print(
                f"round {event['round']}: {event['seconds']:.1f}s, lr {event['lr']:.2e}, loss per adapter {{{losses}}}, "
                f"{(event['bytes_up'] + event['bytes_down']) / 1e6:.1f} MB sent"
            )
        elif kind == "failed":
            self.console.print(f"[red]run failed: {event['error']}")
        elif kind == "rejected":
            self.console.print(f"[yellow]{event['phase']}: rejected {event['who']}: {event['reason']}")
        elif kind == "resumed":
            self.console.print(f"resuming after round {event['rounds_done']} (checkpoint)")
        elif kind == "joined":
            self.console.print(
                f"client {event['client']} joined: global clusters {event['assignment']}"
                + (f" (opened {event['new_clusters']})" if event["new_clusters"] else "")
            )


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary_tables(metrics: dict) -> list[Table]:
    """ROUGE-1 per client and task for every (test set, routing mode), then a one-line overview."""
    tables: list[Table] = []
    evaluation = metrics.get("evaluation", {}).get("by_set", {})
    unlabelled = metrics.get("clustering", {}).get("task_labels", True) is False
    for name, result in evaluation.items():
        tasks = list(result["per_task"])
        table = Table(title=f"ROUGE-1 — {name}", show_lines=False)
        table.add_column("client")
        for task in tasks:
            table.add_column(task, justify="right")
        for client, by_task in result["per_client"].items():
            table.add_row(str(client), *(f"{by_task[t]['rouge1']:.1f}" if t in by_task else "·" for t in tasks))
        table.add_row("[bold]mean", *(f"[bold]{result['per_task'][t]['rouge1']:.1f}" for t in tasks), end_section=True)
        tables.append(table)
    overview = Table(title="Run summary")
    overview.add_column("test set / routing or method", no_wrap=True, min_width=21)
    for column in ("ROUGE-1", "ROUGE-2", "ROUGE-L", "exact match", "routing acc"):
        overview.add_column(column, justify="right")
    for name, result in evaluation.items():
        overview.add_row(
            name,
            *(f"{result[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL", "exact_match")),
            "no task labels" if unlabelled else _fraction(result["routing_acc"]),
        )
    tables.append(overview)
    clustering = metrics.get("clustering", {})
    facts = Table(show_header=False, title="Clustering, time, traffic")
    facts.add_row("local clusters per client", str(clustering.get("local_k")))
    facts.add_row("global clusters", str(clustering.get("global_k")))
    if clustering.get("task_labels", True) is False:
        facts.add_row("clustering accuracy (local / global)", "no task labels")
    else:
        facts.add_row(
            "clustering accuracy (local / global)",
            f"{_fraction(clustering.get('cluster_acc_local'))} / {_fraction(clustering.get('cluster_acc_global'))}",
        )
    phases = metrics.get("phases", {})
    facts.add_row(
        "time",
        f"{metrics.get('wall_s', 0):.0f}s (clustering {phases.get('clustering_s', 0):.0f}s, training "
        f"{phases.get('training_s', 0):.0f}s, evaluation {metrics.get('evaluation_s', 0):.0f}s)",
    )
    sent = metrics.get("bytes", {})
    facts.add_row(
        "bytes sent",
        f"{sent.get('up_total', 0) / 1e6:.1f} MB up, {sent.get('down_total', 0) / 1e6:.1f} MB down "
        f"(one adapter: {sent.get('adapter_bytes', 0) / 1e6:.2f} MB)",
    )
    tables.append(facts)
    return tables
