"""What a person sees: live progress from a run's event stream, and the end-of-run summary tables."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fedrouter.algorithm.naming import adapter_id, cluster_names
from fedrouter.runlog import EVENTS, read_events


class ProgressFollower:
    """Follows ``events.jsonl`` in a thread and draws phase, round, client progress and time left."""

    def __init__(self, run_dir: Path, clients: int, rounds: int, console: Console) -> None:
        self.path = Path(run_dir) / EVENTS
        self._offset = self.path.stat().st_size if self.path.exists() else 0  # a resumed run: only new events
        self.console = console
        self.counter = ReplyCounter()  # replies counted per phase and round: the bar never shows more than it waits for
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("replies"),
            TimeElapsedColumn(),
            TimeLeftColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task("starting (loading data and model)", total=clients)
        self._key: tuple | None = None
        self.clients, self.rounds = clients, rounds
        self.events: list[dict] = []  # what ``time_left`` estimates from
        self._phase = ""
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
        if events:
            self.estimate()

    def estimate(self) -> None:
        """Time left from the events so far (``time_left``); the column counts it down until the next events."""
        seconds = time_left(self.events)
        where = " in training" if self._phase == "training" else ""  # the evaluation counts once it is measured
        self.progress.update(self.task, left=None if seconds is None else (seconds, time.monotonic(), where))

    def _show(self, event: dict) -> None:
        kind = event["event"]
        self.events.append(event)
        counted = self.counter.add(event)
        if counted is not None:
            if counted["key"] != self._key:  # a new phase or round: its own count from 0
                self._key = counted["key"]
                label = counted["label"]
                if label.startswith("training round"):
                    label = f"round {counted['round']}/{self.rounds}: training"
                self.progress.reset(self.task, total=counted["total"], completed=0, description=label)
            self.progress.update(self.task, total=counted["total"], completed=counted["done"])
            return
        if kind == "phase":
            name = self._phase = event["name"]
            label = f"round {event['round']}/{event['rounds']}: training" if name == "training" else name
            if name == "clustering":
                label = "embedding and local clustering"
            self._key = None  # no reply of this phase yet: 0 of one per client
            self.progress.reset(self.task, total=self.clients, completed=0, description=label)
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


class TimeLeftColumn(ProgressColumn):
    """The task's ``left`` field (seconds, when estimated, what it covers), counting down; blank without one."""

    def render(self, task: Task) -> Text:
        estimate = task.fields.get("left")
        if estimate is None:
            return Text("")
        seconds, at, where = estimate
        left = int(max(seconds - (time.monotonic() - at), 0.0))
        return Text(f"~{left // 60}:{left % 60:02d} left{where}", style="progress.remaining")


def time_left(events: list[dict], now: float | None = None) -> float | None:
    """Estimated seconds until the run ends, from the step times measured in ``events`` (``t``: seconds since start).

    Training: the mean time of the finished rounds (from a round's ``phase`` event to its ``round`` event, its round
    check included) times the rounds left, less what the current round has taken. Evaluation, once replies are in:
    the time per reply so far times the replies still out. None when what is left has not been measured (before
    the first round ends, between the last round and the evaluation's first reply); 0 once the run is done or
    failed. ``now``: the time on the events' clock (default: the last event's).
    """
    rounds = done = 0
    spans: list[float] = []  # seconds of each finished round
    started: float | None = None  # when the current round, or the evaluation, began
    evaluating, replies = False, (0, 0)
    for event in events:
        kind, t = event.get("event"), float(event.get("t", 0.0))
        if kind in ("done", "failed"):
            return 0.0
        if kind == "start":  # a new process (a resume): what came before is not this run's clock
            rounds, done, spans, started, evaluating = int(event.get("rounds") or 0), 0, [], None, False
        elif kind == "resumed":
            done = int(event["rounds_done"])
        elif kind == "phase" and event.get("name") in ("training", "evaluation"):
            started, evaluating, replies = t, event["name"] == "evaluation", (0, 0)
            rounds = int(event.get("rounds") or rounds)
        elif kind == "round" and started is not None:
            spans.append(t - started)
            done, started = int(event["round"]), None
        elif kind == "reply" and evaluating and event.get("phase") == "evaluation":
            replies = (int(event.get("done") or 0), int(event.get("total") or 0))
    if now is None:
        now = float(events[-1].get("t", 0.0)) if events else 0.0
    running = now - started if started is not None else 0.0
    if evaluating:
        got, total = replies
        return max(running / got * (total - got), 0.0) if got > 0 else None
    if not spans or done >= rounds:
        return None
    return max(sum(spans) / len(spans) * (rounds - done) - running, 0.0)


class ReplyCounter:
    """Replies counted per phase and round, from ``reply`` events (``phase``, ``done``, ``total``).

    One run sends several batches of messages (clustering, the initial adapter, refinement, each training round,
    its learning-curve check, the evaluation): each batch is counted on its own, ``done`` capped at its ``total``.
    A batch starts at a ``phase`` event, at a reply of another phase label, or when ``done`` starts again.
    """

    def __init__(self) -> None:
        self.round = 0
        self.batch = 0
        self.current: dict | None = None
        self.counts: list[dict] = []

    def add(self, event: dict) -> dict | None:
        """The count ``event`` changes (key, label, phase, round, done, total), or None for another event."""
        kind = event.get("event")
        if kind == "phase":
            self.round = int(event.get("round") or 0)
            self.batch += 1
            return None
        if kind != "reply":
            return None
        phase = str(event.get("phase", "replies"))
        total = max(int(event.get("total") or 0), 0)
        done = max(int(event.get("done") or 0), 0)
        current = self.current
        if current is None or current["phase"] != phase or current["batch"] != self.batch or done <= current["done"]:
            if current is not None and current["phase"] == phase and current["batch"] == self.batch:
                self.batch += 1  # the same phase sent again (a retry): a new batch
            label = f"round {self.round}: {phase}" if phase == "round check" else phase
            key = (self.batch, phase, self.round)
            current = {"key": key, "label": label, "phase": phase, "round": self.round, "done": 0, "total": total}
            current["batch"] = self.batch
            self.counts.append(current)
            self.current = current
        current["total"] = max(current["total"], total)
        current["done"] = min(max(current["done"], done), current["total"])
        return current


def reply_counts(events: list[dict]) -> list[dict]:
    """Every batch of replies of a run's events, in order: ``{"phase", "round", "done", "total", ...}``."""
    counter = ReplyCounter()
    for event in events:
        counter.add(event)
    return counter.counts


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def lost_clients(metrics: dict) -> dict[str, dict]:
    """The clients that did not take part through the end: ``{"client 2": {"phases": [...], "reason": ...}}``.

    A client is lost when it never got into the run (no valid clustering reply, never connected, or it did not
    come back on a resume), when a training round rejected it (a crash, a lost node, no reply in time, an invalid
    or screened-out update), or when it is missing from the evaluation. ``reason``: the first one recorded.
    """
    lost: dict[str, dict] = {}

    def add(who: str, phase: str | int, why: str) -> None:
        entry = lost.setdefault(who, {"phases": [], "reason": why})
        if phase not in entry["phases"]:
            entry["phases"].append(phase)

    clustering = metrics.get("clustering", {})
    present = {str(c) for c in clustering.get("local_k", {})}
    rejected = "; ".join(f"{who}: {why}" for who, why in metrics.get("clustering_rejected", {}).items())
    for i in range(int(metrics.get("config", {}).get("data.num_clients") or 0)):
        if str(i) not in present:
            add(
                f"client {i}",
                "clustering",
                f"no valid clustering reply ({rejected})" if rejected else "never connected",
            )
    for resume in metrics.get("resumed", []):
        for who, why in resume.get("lost", {}).items():
            add(who, f"resume after round {resume['after_round']}", why)
    for record in metrics.get("rounds", []):
        for who, why in record.get("rejected", {}).items():
            add(who, int(record["round"]), why)
    for who, why in metrics.get("evaluation", {}).get("missing_clients", {}).items():
        add(who, "evaluation", why)
    return dict(sorted(lost.items(), key=lambda item: _client_order(item[0])))


def _client_order(who: str) -> tuple:
    name, _, number = who.rpartition(" ")
    return (name, int(number)) if number.isdigit() else (who, 0)


def describe_lost(lost: dict[str, dict]) -> str:
    """One line per lost client: the phases it missed (runs of rounds shortened) and the first reason."""
    lines = []
    for who, entry in lost.items():
        rounds = [p for p in entry["phases"] if isinstance(p, int)]
        spans: list[list[int]] = []
        for r in rounds:
            if spans and r == spans[-1][1] + 1:
                spans[-1][1] = r
            else:
                spans.append([r, r])
        shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
        phases = [p for p in entry["phases"] if p != "evaluation" and not isinstance(p, int)]
        phases += [f"round{'s' if len(rounds) > 1 else ''} {shown}"] if rounds else []
        phases += ["evaluation"] if "evaluation" in entry["phases"] else []
        reason = entry["reason"] if len(entry["reason"]) <= 160 else entry["reason"][:157] + "..."
        lines.append(f"{who}: {', '.join(phases)} ({reason})")
    return "\n".join(lines)


def summary_tables(metrics: dict, names: list[str] | None = None) -> list[Table]:
    """ROUGE-1 per client and task for every (test set, routing mode), then a one-line overview.

    ``names``: each global cluster's name as the router artifact keeps it (renames included); by default the
    names a run gives from its clustering (``naming.cluster_names``)."""
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
    if clustering.get("global_k"):
        if names is None:
            names = cluster_names(clustering.get("global_cluster_tasks", {}), clustering["global_k"])
        facts.add_row("adapters", ", ".join(f"{adapter_id(g)}: {escape(name)}" for g, name in enumerate(names)))
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
    lost = lost_clients(metrics)
    facts.add_row("clients lost", describe_lost(lost) if lost else "none: every client took part through the end")
    tables.append(facts)
    return tables
