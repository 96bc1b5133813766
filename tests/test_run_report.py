"""The run report (``fedrouter report``), in files and in Chromium, and the live progress (reply counts, time
left), on one real run of the tiny model."""

import html
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import headless_browser, require_browser

from fedrouter.algorithm.evaluation import eval_key, summarize_evaluation
from fedrouter.report import ProgressFollower, ReplyCounter, TimeLeftColumn, reply_counts, time_left
from fedrouter.run_report import loss_curves, write_report
from fedrouter.runlog import read_events

CLI = (sys.executable, "-m", "fedrouter.cli")
CHARTS = ("loss.png", "rouge1.png", "routing.png", "centroids.png", "cost.png")
ROUTED = ("routed-personalized-global.png", "routed-personalized-local.png")  # a router's two modes


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
    for mode, result in by_set.items():
        routed = tables[f"{prefix}routed-{mode}"]
        for task, by_adapter in result["routed"].items():
            for adapter, n in by_adapter.items():
                assert routed[task][routed["__header__"].index(f"adapter {adapter}")] == str(n)
            tested = sum(by_task[task]["n"] for by_task in result["per_client"].values() if task in by_task)
            assert sum(int(c) for c in routed[task][1:]) == tested  # every test sample went to one adapter
    names = tables[f"{prefix}names"]  # the router artifact's names, one per global cluster
    run_folder = Path(metrics["config"]["run.output_dir"]) / metrics["config"]["run.name"]
    stored = json.loads((run_folder / "router" / "router.json").read_text())["cluster_names"]
    assert {key: cells[1] for key, cells in names.items() if key != "__header__"} == stored
    cost = tables[f"{prefix}cost"]
    assert cost["training"][2] == str(sum(r["bytes_up"] for r in metrics["rounds"]))
    assert cost["clustering"][1] == f"{metrics['phases']['clustering_s']:.1f}"


def test_the_run_writes_a_self_contained_report(run_dir):
    folder = run_dir / "report"
    page = (folder / "index.html").read_text()
    images = _check_self_contained(page, folder)
    assert sorted(images) == sorted(CHARTS + ROUTED)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _check_run_tables(_tables(page), metrics)


def test_a_run_without_route_counts_still_reports(run_dir, tmp_path):
    """Runs written before ``routed`` was recorded: the same page, without the per-mode routing charts."""
    old = tmp_path / "old"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("report", "checkpoint*"))
    metrics = json.loads((old / "metrics.json").read_text())
    for result in metrics["evaluation"]["by_set"].values():
        del result["routed"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    page = write_report([old]).read_text()
    assert sorted(_check_self_contained(page, old / "report")) == sorted(CHARTS)


def test_routes_are_counted_per_routing_mode_after_routing():
    """``routed``: each client's route counts summed per (set/mode, true task, adapter); none for non-routers."""

    def client(routes: dict[tuple[str, str], dict[str, int]]) -> dict[str, float]:
        values = {}
        for (mode, task), by_adapter in routes.items():
            n = sum(by_adapter.values()) or 1
            values |= {eval_key("personalized", mode, task, k): 0.0 for k in ("rouge1", "rouge2", "rougeL")}
            values |= {eval_key("personalized", mode, task, "exact_match"): 0.0}
            values |= {eval_key("personalized", mode, task, "n"): float(n)}
            values |= {eval_key("personalized", mode, task, "route", a): float(c) for a, c in by_adapter.items()}
        return values

    per_client = {
        0: client({("global", "qa"): {"0": 2, "1": 1}, ("local", "qa"): {"0": 3}}),
        1: client({("global", "qa"): {"0": 1}, ("global", "sum"): {"1": 2}, ("local", "sum"): {"1": 2}}),
        2: client({("fedit", "qa"): {}}),  # a method that does not route sends no route counts
    }
    train_table = np.array([[5, 0], [0, 5]])  # global cluster x task (qa, sum)
    by_set = summarize_evaluation(per_client, train_table, ["qa", "sum"])["by_set"]
    assert by_set["personalized/global"]["routed"] == {"qa": {"0": 3, "1": 1}, "sum": {"1": 2}}
    assert by_set["personalized/local"]["routed"] == {"qa": {"0": 3}, "sum": {"1": 2}}
    assert by_set["personalized/global"]["routing_acc"] == 5 / 6
    assert "routed" not in by_set["personalized/fedit"]


def _dom_tables(driver) -> dict[str, dict[str, list[str]]]:
    """``{table id: {row key: [cells], "__header__": [...]}}`` as the browser renders the page."""
    return driver.execute_script(
        """const out = {};
        for (const table of document.querySelectorAll("table[id]")) {
          const rows = {__header__: [...table.querySelectorAll("th")].map(th => th.textContent)};
          for (const tr of table.querySelectorAll("tr[data-key]"))
            rows[tr.dataset.key] = [...tr.querySelectorAll("td")].map(td => td.textContent);
          out[table.id] = rows;
        }
        return out;"""
    )


def test_the_report_renders_in_chromium_with_every_chart_and_the_run_s_numbers(run_dir, tmp_path):
    require_browser()
    out = tmp_path / "page"
    done = subprocess.run([*CLI, "report", str(run_dir), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    driver = headless_browser(1200, 900)
    try:
        driver.get((out / "index.html").as_uri())
        images = driver.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"
        )
        tables = _dom_tables(driver)
    finally:
        driver.quit()
    assert sorted(src for src, _, _ in images) == sorted(CHARTS + ROUTED)
    assert all(complete and width > 0 for _, complete, width in images), images
    _check_run_tables(tables, metrics)


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
    by_phase_and_round = {(c["phase"], c["round"]) for c in counts}
    assert {
        ("clustering", 0),
        ("training round 1", 1),
        ("training round 2", 2),
        ("evaluation", 2),
    } <= by_phase_and_round
    assert all(0 < c["done"] <= c["total"] for c in counts)
    counter = ReplyCounter()  # every count as the bar showed it, not only the final ones
    for event in events:
        count = counter.add(event)
        assert count is None or 0 < count["done"] <= count["total"], (event, count)
    assert all(c["done"] == c["total"] for c in counts)  # every client replied in every phase
    replays = events + [e for e in events if e["event"] == "reply"]  # the same replies again (a retry, a re-read)
    assert all(c["done"] <= c["total"] for c in reply_counts(replays))


def test_time_left_from_measured_steps():
    events = [
        {"t": 0.0, "event": "start", "rounds": 3},
        {"t": 1.0, "event": "phase", "name": "clustering", "round": 0},
        {"t": 10.0, "event": "phase", "name": "training", "round": 1, "rounds": 3},
    ]
    assert time_left(events, now=15.0) is None  # no round has finished: nothing measured
    events += [{"t": 20.0, "event": "round", "round": 1}, {"t": 20.0, "event": "phase", "name": "training"}]
    assert time_left(events) == 20.0  # two rounds of 10 s left
    assert time_left(events, now=25.0) == 15.0  # 5 s into the second
    assert time_left(events, now=45.0) == 0.0  # a slow round: never below 0
    events += [{"t": 30.0, "event": "round", "round": 2}, {"t": 30.0, "event": "phase", "name": "training"}]
    events += [{"t": 40.0, "event": "round", "round": 3}]
    assert time_left(events) is None  # training is over; the evaluation is not measured yet
    events += [{"t": 40.0, "event": "phase", "name": "evaluation"}]
    assert time_left(events, now=50.0) is None
    events += [{"t": 44.0, "event": "reply", "phase": "evaluation", "done": 1, "total": 4}]
    assert time_left(events) == 12.0  # 4 s per reply, 3 replies out
    events += [{"t": 45.0, "event": "done"}]
    assert time_left(events) == 0.0


def test_time_left_over_a_real_run_shrinks_to_zero(run_dir):
    events, _ = read_events(run_dir / "events.jsonl")
    estimates = [time_left(events[: i + 1]) for i in range(len(events))]
    first_round = next(i for i, e in enumerate(events) if e["event"] == "round")
    evaluation = next(i for i, e in enumerate(events) if e["event"] == "phase" and e["name"] == "evaluation")
    assert all(e is None for e in estimates[:first_round])  # nothing measured: nothing said
    assert all(e is None or e >= 0 for e in estimates)
    training = [e for e in estimates[first_round:evaluation] if e is not None]
    assert training and training[0] > 0 and all(a >= b for a, b in itertools.pairwise(training))
    replies = [estimates[i] for i, e in enumerate(events) if e["event"] == "reply" and e["phase"] == "evaluation"]
    assert replies[-1] == 0.0 and estimates[-1] == 0.0 and events[-1]["event"] == "done"


def test_progress_bar_shows_each_phase_in_its_own_count(run_dir, tmp_path):
    from rich.console import Console

    events, _ = read_events(run_dir / "events.jsonl")
    follower = ProgressFollower(tmp_path, clients=2, rounds=2, console=Console(file=open(tmp_path / "p", "w")))  # noqa: SIM115
    seen = []
    for event in events:
        follower._show(event)
        task = follower.progress.tasks[0]
        seen.append((task.completed, task.total))
    follower.estimate()
    follower.console.file.close()
    assert all(done <= total for done, total in seen)
    assert seen[-1][0] == seen[-1][1] == 2
    assert str(TimeLeftColumn().render(follower.progress.tasks[0])) == "~0:00 left"  # the run is done
