"""Processes, resume and lost clients: a killed run leaves no process behind, a resumed run's metrics equal an
uninterrupted run's, and a run that lost a client says so in its summary and its exit status.

Every process these tests look at or end provably belongs to the run under test: it is in the session the test
started the run in (``start_new_session``), it uses the run's own Ray root (recorded in the run folder), or it
carries the test's deployment folder in its ``FLWR_HOME``.
"""

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_settings
from flwr.clientapp import ClientApp

from fedrouter import cli, simulation
from fedrouter.config import Config
from fedrouter.federated import client, membership
from fedrouter.report import describe_lost, lost_clients
from fedrouter.simulation import RAY_RECORD, ray_root_processes, reap_leftovers, run_experiment

# --- the rule: which clients a run lost, and the exit status -------------------------------------------------


def test_lost_clients_are_named_with_the_phases_they_missed():
    metrics = {
        "config": {"data.num_clients": 4},
        "clustering": {"local_k": {"0": 1, "1": 2, "2": 1}},  # client 3 never got in
        "clustering_rejected": {"node 77": "node 77: every local cluster must count at least one sample"},
        "rounds": [
            {"round": 1, "rejected": {}},
            {"round": 2, "rejected": {"client 2": "disconnected (Flower lists the node as offline)"}},
            {"round": 3, "rejected": {"client 2": "disconnected (Flower lists the node as offline)"}},
            {"round": 4, "rejected": {"client 1": "failed: this client crashed"}},
        ],
        "evaluation": {"missing_clients": {"client 2": "disconnected (Flower lists the node as offline)"}},
    }
    lost = lost_clients(metrics)
    assert list(lost) == ["client 1", "client 2", "client 3"]
    assert lost["client 2"]["phases"] == [2, 3, "evaluation"]
    lines = describe_lost(lost).splitlines()
    assert lines[0] == "client 1: round 4 (failed: this client crashed)"
    assert lines[1] == "client 2: rounds 2-3, evaluation (disconnected (Flower lists the node as offline))"
    assert lines[2].startswith("client 3: clustering (no valid clustering reply (node 77:")
    assert cli._exit_status(metrics, allow_lost=False) == cli.LOST_CLIENTS == 3
    assert cli._exit_status(metrics, allow_lost=True) == 0
    whole = {"config": {"data.num_clients": 2}, "clustering": {"local_k": {"0": 1, "1": 1}}, "rounds": []}
    assert lost_clients(whole) == {} and cli._exit_status(whole, allow_lost=False) == 0
    resumed = whole | {"resumed": [{"after_round": 2, "lost": {"client 1": "did not come back"}}]}
    assert describe_lost(lost_clients(resumed)) == "client 1: resume after round 2 (did not come back)"


# --- a killed `fedrouter run` leaves no process -------------------------------------------------------------


def _session(sid: int) -> list[psutil.Process]:
    """The processes of session ``sid`` (the run's: the test started it in a session of its own)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _end_session(sid: int) -> None:
    """Nothing a test started may outlive it: SIGKILL what is left of the session, process by process."""
    for proc in _session(sid):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _wait_for_training(proc: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(e["event"] == "phase" and e.get("name") == "training" for e in _events(run_dir)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no training round started (exit {proc.poll()}); see {run_dir}")


def _wait_until(check, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return check()


@pytest.mark.slow
@pytest.mark.parametrize("watcher_killed", [False, True], ids=["watcher", "next-start"])
def test_a_killed_run_leaves_no_ray_process(tmp_path, watcher_killed):
    settings = tiny_settings(tmp_path, **{"run.rounds": 3, "eval.sets": "personalized", "run.name": "killed"})
    run_dir = tmp_path / "killed"
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", *(f"{k}={v}" for k, v in settings.items())],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    sid = proc.pid
    try:
        _wait_for_training(proc, run_dir)
        record = json.loads((run_dir / RAY_RECORD).read_text())
        root = record["ray_root"]

        def agents_up() -> bool:  # Ray starts its agents a little after training can begin (later on a busy host)
            titles = {" ".join(p.cmdline()) for p in _session(sid)}
            return any("DashboardAgent" in t for t in titles) and any("RuntimeEnvAgent" in t for t in titles)

        # The processes that used to outlive a killed run are there, and all of Ray's use the run's root.
        assert _wait_until(agents_up, 30), {" ".join(p.cmdline()) for p in _session(sid)}
        running = _session(sid)
        titles = {" ".join(p.cmdline()) for p in running}
        ray = {p.pid for p in ray_root_processes(root)}
        assert {p.pid for p in running} - ray <= {proc.pid, record["watcher"]}, titles

        if watcher_killed:  # the watcher dies first: the next run started in the same output folder cleans up
            os.kill(record["watcher"], signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if watcher_killed:
            # Ray's parent-death signal ends its GCS server and raylet; the raylet's agents stay (the bug) ...
            assert _wait_until(lambda: len(_session(sid)) == len(ray_root_processes(root)) > 0, 30)
            leftover = {p.pid for p in _session(sid)}
            assert any("Agent" in " ".join(p.cmdline()) for p in _session(sid))
            reaped = reap_leftovers(tmp_path)  # ... until the next start (run_experiment calls this first)
            assert leftover <= set(reaped)
        assert _wait_until(lambda: not _session(sid), 30), [p.cmdline() for p in _session(sid)]
        assert not (run_dir / RAY_RECORD).exists() and not Path(root).exists()
        assert reap_leftovers(tmp_path) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _end_session(sid)


# --- a resumed run equals the uninterrupted one ---------------------------------------------------------------

TIMINGS = {"elapsed_s", "wall_s", "seconds", "evaluation_s", "embed_s", "local_cluster_s", "clustering_s", "training_s"}


def _differences(a, b, path: str = "") -> list[str]:
    """Every place where two metrics documents differ, timings left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            if key in TIMINGS:
                continue
            if key not in a or key not in b:
                found.append(f"{path}.{key}: only in the {'first' if key in a else 'second'}")
            else:
                found += _differences(a[key], b[key], f"{path}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_a_resumed_run_has_the_metrics_of_an_uninterrupted_run(tmp_path, monkeypatch):
    # FedRouter with its refinement round (local_k_before_refinement), a learning-curve check after each round.
    settings = tiny_settings(tmp_path, **{"run.rounds": 2, "eval.sets": "personalized", "eval.round_samples": 1})
    _, whole = run_experiment(Config(settings | {"run.name": "whole"}))

    admit = membership.admit_late_clients

    def crash_before_round_2(grid, cfg, run, method, state):
        if state.rounds_done == 1 and not cfg["run.resume"]:
            raise RuntimeError("the server crashed")
        return admit(grid, cfg, run, method, state)

    monkeypatch.setattr(membership, "admit_late_clients", crash_before_round_2)
    with pytest.raises(RuntimeError, match="the server crashed"):
        run_experiment(Config(settings | {"run.name": "cut"}))
    cut = tmp_path / "cut"
    assert [r["round"] for r in json.loads((cut / "metrics.json").read_text())["rounds"]] == [1]
    _, resumed = run_experiment(Config(settings | {"run.name": "cut", "run.resume": str(cut)}))

    assert resumed.pop("resumed") == [{"after_round": 1}]
    assert whole["config"].pop("run.name") == "whole" and resumed["config"].pop("run.name") == "cut"
    assert whole["clustering"]["local_k_before_refinement"]  # the field the resume used to lose
    assert _differences(whole, resumed) == []
    assert lost_clients(resumed) == {}


# --- a run that lost a client: summary and exit status ----------------------------------------------------------

lossy = ClientApp()  # FedRouter's client, except that client 1 crashes in every training round


@lossy.query("cluster")
def _cluster(message, context):
    return client.cluster(message, context)


@lossy.query("refine")
def _refine(message, context):
    return client.refine(message, context)


@lossy.query("initial")
def _initial(message, context):
    return client.initial(message, context)


@lossy.train()
def _train(message, context):
    if int(context.node_config["partition-id"]) == 1:
        raise RuntimeError("this client crashed")
    return client.train(message, context)


@lossy.evaluate()
def _evaluate(message, context):
    return client.evaluate(message, context)


@pytest.mark.slow
def test_a_run_that_lost_a_client_exits_3_and_names_it(tmp_path, monkeypatch, capsys):
    settings = tiny_settings(tmp_path, **{"run.name": "lossy", "eval.sets": "personalized"})
    monkeypatch.setattr(simulation, "run_experiment", functools.partial(run_experiment, client_app=lossy))
    code = cli.main(["run", "--quiet", *(f"{k}={v}" for k, v in settings.items())])
    out, err = capsys.readouterr()
    assert code == 3, err[-2000:]
    assert "clients lost" in out and "client 1" in out
    assert "finished without 1 client(s), exit status 3" in err
    assert "client 1: rounds 1-2 (failed: " in err and "this client crashed" in err


def _deployment_processes(flwr_home: Path) -> list[psutil.Process]:
    """Processes of the test's deployment: they carry its FLWR_HOME (deploy-local sets it for each)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
    return found


@pytest.mark.slow
def test_deploy_local_with_a_dead_supernode_exits_3_and_names_the_client(tmp_path):
    settings = tiny_settings(
        tmp_path, **{"run.name": "lost", "eval.sets": "personalized", "run.reply_timeout_s": 300, "run.rounds": 2}
    )
    overrides = [f"{k}={v}" for k, v in settings.items() if k != "data.num_clients"]
    home = tmp_path / "lost-deployment" / "flwr-home"
    with open(tmp_path / "deploy.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedrouter.cli", "deploy-local", "--nodes", "3", "--quiet", *overrides],
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for_training(proc, tmp_path / "lost", timeout=400)
        node = [p for p in _deployment_processes(home) if "client-id=2" in " ".join(p.cmdline())]
        assert len(node) == 1, [p.cmdline() for p in _deployment_processes(home)]
        family = [node[0], *node[0].children(recursive=True)]  # the SuperNode and its ClientApp processes
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        assert proc.wait(timeout=600) == 3, (tmp_path / "deploy.log").read_text()[-3000:]
        output = (tmp_path / "deploy.log").read_text()
        assert "exit status 3" in output and "client 2: " in output
        assert not _deployment_processes(home)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for p in _deployment_processes(home):
            with contextlib.suppress(psutil.Error):
                p.kill()
