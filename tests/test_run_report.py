"""The run report (``fedrouter report``) and the live progress counts, on one real run of the tiny model."""

import html
import json
import re
import shutil
import subprocess
import sys

import pytest

from fedrouter.report import ProgressFollower, reply_counts
from fedrouter.run_report import loss_curves, write_report
from fedrouter.runlog import read_events

CLI = (sys.executable, "-m", "fedrouter.cli")
CHARTS = ("loss.png", "rouge1.png", "routing.png", "centroids.png", "cost.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-client, 2-round run through the CLI: it writes its report at the end."""
    tmp = tmp_path_factory.mktemp("report")
    flags = [
        "--quiet",
        "--model",
        "tiny-random",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--output",
        str(tmp),
        "--name",
        "a",
    ]
    done = subprocess.run(
        [*CLI, "run", *flags, "data.train_per_client=8", "eval.max_new_tokens=2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "report:" in done.stderr
    return tmp / "a"


def _tables(page: str) -> dict[str, dict[str, list[str]]]:
    """``{table id: {row key: [cells]}}`` of the page."""
    tables = {}
    for table_id, body in re.findall(r'<table id="([^"]*)">(.*?)</table>', page, re.S):
        rows = {}
        for key, row in re.findall(r'<tr data-key="([^"]*)">(.*?)</tr>', body, re.S):
            rows[html.unescape(key)] = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        header = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", body, re.S)]
        rows["__header__"] = header
        tables[html.unescape(table_id)] = rows
    return tables


def _check_self_contained(page: str, folder) -> list[str]:
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images and all((folder / name).is_file() for name in images)
    assert not re.search(r'(src|href)="https?:', page) and "<script" not in page and "<link" not in page
    return images


def _check_run_tables(tables: dict, metrics: dict, prefix: str = "") -> None:
    rouge = tables[f"{prefix}rouge1"]
    modes = rouge["__header__"][1:]
    by_set = metrics["evaluation"]["by_set"]
    assert modes == list(by_set)
    for mode_index, mode in enumerate(modes):
        for task, values in by_set[mode]["per_task"].items():
            assert rouge[task][1 + mode_index] == f"{values['rouge1']:.2f}"
        assert rouge["overall"][1 + mode_index] == f"{by_set[mode]['rouge1']:.2f}"
    losses = tables[f"{prefix}loss"]
    adapters = {a for r in metrics["rounds"] for a in r["train_loss"]}
    assert sorted(loss_curves(metrics)) == sorted(adapters) and adapters
    for adapter in adapters:
        last = [r for r in metrics["rounds"] if adapter in r["train_loss"]][-1]
        assert losses[adapter][3] == f"{last['train_loss'][adapter]:.4f}"
    routing = tables[f"{prefix}routing"]
    for cluster, mix in metrics["clustering"]["global_cluster_tasks"].items():
        column = routing["__header__"].index(f"adapter {cluster}")
        for task, n in mix.items():
            assert routing[task][column] == str(n)
    cost = tables[f"{prefix}cost"]
    assert cost["training"][2] == str(sum(r["bytes_up"] for r in metrics["rounds"]))
    assert cost["clustering"][1] == f"{metrics['phases']['clustering_s']:.1f}"


def test_the_run_writes_a_self_contained_report(run_dir):
    folder = run_dir / "report"
    page = (folder / "index.html").read_text()
    images = _check_self_contained(page, folder)
    assert sorted(images) == sorted(CHARTS)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _check_run_tables(_tables(page), metrics)


def test_two_runs_side_by_side(run_dir, tmp_path):
    other = tmp_path / "b"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("report", "checkpoint*"))
    metrics = json.loads((other / "metrics.json").read_text())
    for i, result in enumerate(metrics["evaluation"]["by_set"].values()):  # numbers of its own, told apart
        result["rouge1"] = 40.0 + i
        for j, values in enumerate(result["per_task"].values()):
            values["rouge1"] = 10.0 * (j + 1) + i
    (other / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "both"
    done = subprocess.run(
        [*CLI, "report", str(run_dir), str(other), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    page = (out / "index.html").read_text()
    images = _check_self_contained(page, out)
    assert "runs.png" in images and all(f"{p}-{c}" in images for p in ("a", "b") for c in CHARTS)
    tables = _tables(page)
    _check_run_tables(tables, metrics, "b-")
    _check_run_tables(tables, json.loads((run_dir / "metrics.json").read_text()), "a-")
    side = tables["runs"]
    assert side["b"][2:4] == ["40.00", "41.00"] and side["a"][2] == "0.00"
    several = subprocess.run([*CLI, "report", str(run_dir), str(other)], capture_output=True, text=True)
    assert several.returncode == 2 and "--out" in several.stderr


def test_a_report_that_fails_never_changes_the_run(tmp_path):
    from rich.console import Console

    from fedrouter.cli import write_run_report

    console = Console(file=open(tmp_path / "out.txt", "w"), width=200)  # noqa: SIM115
    write_run_report(tmp_path / "missing", console)  # no metrics.json: a warning, no exception
    console.file.close()
    assert "warning: no run report" in (tmp_path / "out.txt").read_text()
    with pytest.raises(Exception, match="metrics.json"):
        write_report([tmp_path / "missing"])


def test_progress_counts_never_exceed_their_totals(run_dir):
    events, _ = read_events(run_dir / "events.jsonl")
    counts = reply_counts(events)
    phases = [c["phase"] for c in counts]
    assert phases[0] == "clustering" and "training round 2" in phases and phases[-1] == "evaluation"
    assert all(0 < c["done"] <= c["total"] for c in counts)
    assert all(c["done"] == c["total"] for c in counts)  # every client replied in every phase
    replays = events + [e for e in events if e["event"] == "reply"]  # the same replies again (a retry, a re-read)
    assert all(c["done"] <= c["total"] for c in reply_counts(replays))


def test_progress_bar_shows_each_phase_in_its_own_count(run_dir, tmp_path):
    from rich.console import Console

    events, _ = read_events(run_dir / "events.jsonl")
    follower = ProgressFollower(tmp_path, clients=2, rounds=2, console=Console(file=open(tmp_path / "p", "w")))  # noqa: SIM115
    seen = []
    for event in events:
        follower._show(event)
        task = follower.progress.tasks[0]
        seen.append((task.completed, task.total))
    follower.console.file.close()
    assert all(done <= total for done, total in seen)
    assert seen[-1][0] == seen[-1][1] == 2
