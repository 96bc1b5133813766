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


def test_flwr_run_on_the_managed_local_superlink(tmp_path):
    busy = [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == 39091 and c.status == "LISTEN"]
    if busy:
        pytest.fail("port 39091 (Flower's managed local SuperLink) is taken by another process; stop it first")
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    env = dict(
        os.environ,
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        # `flwr run` starts `flower-superlink` from PATH: make it this environment's.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    out = tmp_path / "runs"
    run_config = f'model.name="tiny-random" data.num_clients=3 run.rounds=2 run.output_dir="{out}" run.name="flwr"'
    try:
        done = subprocess.run(
            [flwr, "run", ".", "--federation-config", "num-supernodes=3", "-c", run_config, "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        leftovers = _flower_processes(tmp_path / "flwr-home")
        _stop(leftovers)
    # `flwr run` can exit 0 when the run failed: judge by what the run wrote.
    events_file = out / "flwr" / "events.jsonl"
    assert events_file.is_file(), f"no run folder; flwr run said:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    assert events[-1]["event"] == "done", done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((out / "flwr" / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and metrics["config"]["data.num_clients"] == 3
    assert (out / "flwr" / "router" / "router.json").is_file()
    assert leftovers, "expected to find the managed SuperLink this test started"
    time.sleep(0.5)
    assert not _flower_processes(tmp_path / "flwr-home"), "a Flower process outlived the test"


def test_pyproject_run_config_lists_every_setting():
    import tomllib

    from fedrouter.config import SETTINGS, Config, flatten

    app_config = flatten(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    assert set(app_config) == set(SETTINGS)
    Config(app_config, where="pyproject.toml")  # and every value is valid
