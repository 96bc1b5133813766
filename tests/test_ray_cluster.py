"""A run joins an existing Ray cluster (issue 23): a head and one worker node, each with one core, started on
loopback by the test and stopped with every process they started; the run's two clients land one on each."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_settings

from fedrouter.config import Config
from fedrouter.deploy import free_port
from fedrouter.simulation import backend_config, run_experiment

RAY = Path(sys.executable).parent / "ray"
# Where `ray start --head` records the newest cluster of this machine (what a bare ray.init() would join).
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            found[int(entry.name)] = (parent, command)
    return found


def _root(pid: int, processes: dict, roots: set[int]) -> int | None:
    while pid in processes and pid not in roots:
        pid = processes[pid][0]
    return pid if pid in roots else None


@pytest.fixture
def cluster(tmp_path):
    if not RAY.exists():
        pytest.skip("the ray command is not installed")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    one_core = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    nodes = []
    recorded = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None

    def start(*args: str, log: str) -> subprocess.Popen:
        with (tmp_path / log).open("w") as out:
            node = subprocess.Popen(
                [str(RAY), "start", *one_core, *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        nodes.append(node)
        return node

    def alive_nodes() -> int:
        probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
        done = subprocess.run([sys.executable, "-c", probe % address], capture_output=True, text=True, timeout=120)
        return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0

    try:
        start("--head", f"--port={port}", "--include-dashboard=false", log="head.log")
        deadline = time.monotonic() + 120
        while alive_nodes() < 1:
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(1)
        start(f"--address={address}", log="worker.log")
        while alive_nodes() < 2:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(1)
        yield address, nodes
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        # Every process of this cluster names its GCS (address or port) on its command line: none may be left.
        marks = (address, f"gcs_server_port={port}")

        def left_over() -> list[int]:
            return [pid for pid, (_, command) in _processes().items() if any(m in command for m in marks)]

        deadline = time.monotonic() + 30
        while (left := left_over()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if recorded is None:
            CURRENT_CLUSTER.unlink(missing_ok=True)
        else:
            CURRENT_CLUSTER.write_text(recorded)
        assert not left, f"processes of the test's Ray cluster were left running: {left}"


def test_a_run_joins_an_existing_ray_cluster_and_its_clients_use_both_nodes(cluster, tmp_path):
    address, nodes = cluster
    cfg = Config(
        tiny_settings(tmp_path, **{"run.ray_address": address, "run.client_cpus": 1, "data.num_clients": 2})
        | {"model.threads": 1, "eval.sets": "personalized", "run.rounds": 1}
    )
    backend = backend_config(cfg)
    assert backend["init_args"]["address"] == address and "num_cpus" not in backend["init_args"]
    assert backend["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}

    roots, seen, stop = {node.pid for node in nodes}, set(), threading.Event()

    def watch() -> None:  # which node each client actor process runs under
        while not stop.is_set():
            processes = _processes()
            for pid, (_, command) in processes.items():
                if "ClientAppActor" in command and (root := _root(pid, processes, roots)) is not None:
                    seen.add(root)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_dir, metrics = run_experiment(cfg, tmp_path / "on-cluster")
    finally:
        stop.set()
        watcher.join()
    assert metrics["clustering"]["cluster_map"] and (run_dir / "router").is_dir()
    assert seen == roots, f"client actors ran under {seen} of the nodes {roots}"
