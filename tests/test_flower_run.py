"""The same app under `flwr run .` on Flower's managed local SuperLink (real SuperLink and SuperExec processes)."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def _flower_processes(flwr_home: Path) -> list[psutil.Process]:
    """The local SuperLink started for this FLWR_HOME, and everything it or its SuperExec started."""
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(flwr_home) in cmdline and "flower-superlink" in cmdline:
            found.append(proc)
            found += proc.children(recursive=True)
            for other in psutil.process_iter(["cmdline"]):
                if f"--parent-pid {proc.pid}" in " ".join(other.info["cmdline"] or []):
                    found.append(other)
                    found += other.children(recursive=True)
    return found


def _stop(processes: list[psutil.Process]) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(processes, timeout=15)
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)


def _flwr_run(tmp_path: Path, run_config: str, *options: str, timeout: float = 600) -> tuple:
    """``flwr run . --stream`` on a managed local SuperLink of its own (FLWR_HOME in ``tmp_path``).

    Returns what ``flwr run`` printed, Flower's record of the run (``flwr ls``: its status) and the seconds
    ``flwr run`` took. Every Flower process it started is stopped, by its PID, before it returns.
    """
    busy = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == 39091 and c.status == "LISTEN"]
    if busy:
        pytest.fail("port 39091 (Flower's managed local SuperLink) is taken by another process; stop it first")
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    home = tmp_path / "flwr-home"
    env = dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # `flwr run` starts `flower-superlink` from PATH: make it this environment's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    started = time.monotonic()
    try:
        done = subprocess.run(
            [flwr, "run", ".", *options, "-c", run_config, "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        seconds = time.monotonic() - started
        listed = subprocess.run(
            [flwr, "ls", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        leftovers = _flower_processes(home)
        _stop(leftovers)
    assert leftovers, "expected to find the managed SuperLink this test started"
    time.sleep(0.5)
    assert not _flower_processes(home), "a Flower process outlived the test"
    runs = json.loads(listed.stdout)["runs"]
    assert len(runs) == 1, listed.stdout
    return done.stdout + done.stderr, runs[0], seconds


def test_flwr_run_on_the_managed_local_superlink(tmp_path):
    out = tmp_path / "runs"
    run_config = f'model.name="tiny-random" data.num_clients=3 run.rounds=2 run.output_dir="{out}" run.name="flwr"'
    printed, _, _ = _flwr_run(tmp_path, run_config, "--federation-config", "num-supernodes=3")
    # `flwr run` exits 0 when the run failed: judge by what the run wrote.
    events_file = out / "flwr" / "events.jsonl"
    assert events_file.is_file(), f"no run folder; flwr run said:\n{printed[-6000:]}"
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert events[-1]["event"] == "done", printed[-6000:]
    metrics = json.loads((out / "flwr" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and metrics["config"]["data.num_clients"] == 3
    assert (out / "flwr" / "router" / "router.json").is_file()


def test_flwr_run_with_flowers_default_federation_has_one_client_per_supernode(tmp_path):
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    # No --federation-config, and the pyproject's data.num_clients = 0: the server counts the SuperNodes.
    out = tmp_path / "runs"
    run_config = f'model.name="tiny-random" run.output_dir="{out}" run.name="default" run.rounds=1'
    printed, run, _ = _flwr_run(tmp_path, run_config)
    events = [json.loads(line) for line in (out / "default" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "done", printed[-6000:]
    metrics = json.loads((out / "default" / "metrics.json").read_text())
    supernodes = DEFAULT_SIMULATION_CONFIG.num_supernodes
    assert metrics["config"]["data.num_clients"] == supernodes
    assert len(metrics["clustering"]["local_k"]) == supernodes
    assert run["status"] == "finished:completed", run


def test_flwr_run_fails_at_once_when_the_federation_does_not_fit(tmp_path):
    # 3 SuperNodes (num-partitions = 3) for 2 clients: refused before any client works, with what to change.
    out = tmp_path / "runs"
    run_config = f'model.name="tiny-random" data.num_clients=2 run.rounds=1 run.output_dir="{out}" run.name="x"'
    printed, run, seconds = _flwr_run(tmp_path, run_config, "--federation-config", "num-supernodes=3", timeout=120)
    assert "setting 'data.num_clients' = 2, but the simulation has 3 SuperNodes" in printed, printed[-6000:]
    assert "Traceback" not in printed, printed[-6000:]
    # `flwr run --stream` exits 0 whatever the outcome (Flower 1.42): Flower's record of the run says it failed.
    assert run["status"] == "finished:failed" and "data.num_clients" in run["status-details"], run
    assert seconds < 60, f"took {seconds:.0f}s"
    assert not (out / "x").exists()  # no run folder: nothing ran


def test_pyproject_run_config_lists_every_setting():
    import tomllib

    from fedrouter.config import SETTINGS, Config, flatten

    Config()  # registers the methods, and with them the settings methods bring (ifca.k)
    app_config = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert set(app_config) == set(SETTINGS)
    Config(app_config, where="pyproject.toml")  # and every value is valid
    # `flwr run .` sizes the run to the federation (one client per SuperNode), unlike `fedrouter run`'s default.
    assert app_config["data.num_clients"] == 0
