"""Running a FedRouter experiment in Flower's simulation runtime, on this machine, in this process.

Ray's processes end with the run, however it ends. Ray gives its GCS server, raylet, dashboard, monitor and log
monitor the kernel's parent-death signal, so they die with the run's process even on SIGKILL; but the raylet's
own children (the dashboard agent, the runtime-env agent, and any worker still starting) are then orphaned and
stay. So a run that starts a Ray of its own gives it a fresh temporary root (``ray.init(_temp_dir=...)``,
``/tmp/fedrouter-ray-XXXX``) and a *watcher*: a small process that waits for the run's process to end, by any
exit (its pipe closes, its PID goes), then ends every process that holds a file in, or names in its command
line, that root (every Ray process of the run holds its logs there) and removes the root. The root is recorded in
``RUN_DIR/ray-processes.json`` until then; should the watcher die too, the next run started in the same output
folder (or ``reap_leftovers(OUTPUT_DIR)``) ends those processes. Nothing else is ever signalled: the root is
unique to the run (``mkdtemp``), so a process that uses it provably belongs to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from fedrouter.config import Config
from fedrouter.errors import ConfigError
from fedrouter.runlog import METRICS, default_run_dir

log = logging.getLogger("fedrouter")


def _gpus_per_client(setting: str, gpus: int) -> float:
    """``run.client_gpus`` as a number: 'auto' is one GPU where this machine has any, else none."""
    return (1.0 if gpus else 0.0) if setting == "auto" else float(setting)


def client_resources(cfg: Config, cores: int, gpus: int) -> tuple[float, float]:
    """The CPU cores and GPUs each simulated client holds, on a machine with ``cores`` and ``gpus``.

    Ray starts as many client actors as these fit into the machine, so clients train in parallel when each holds
    a part: ``run.client_cpus = 1`` on 8 cores gives 8 at once, ``run.client_gpus = 0.5`` two per GPU. The
    default (every core, and one GPU where there is one) runs one client at a time, each using all it has.
    """
    cpus = cfg["run.client_cpus"] or (min(cfg["model.threads"], cores) if cfg["model.threads"] else cores)
    setting = cfg["run.client_gpus"]
    per_client = _gpus_per_client(setting, gpus)
    if cpus > cores:
        raise ConfigError(
            f"setting 'run.client_cpus' = {cpus:g}: a client cannot hold more than this machine's {cores} cores"
        )
    if per_client > 0 and gpus == 0:
        raise ConfigError(f"setting 'run.client_gpus' = {setting!r}: this machine has no CUDA GPU; set it to 0")
    if per_client > gpus or (per_client > 1 and not per_client.is_integer()):
        raise ConfigError(
            f"setting 'run.client_gpus' = {setting!r}: expected at most the machine's {gpus} GPUs, a whole number "
            "above 1 (a fraction shares one GPU)"
        )
    if cfg["model.quantization"] != "none" and per_client == 0:
        raise ConfigError(
            f"setting 'model.quantization' = {cfg['model.quantization']!r} needs clients on CUDA GPUs (bitsandbytes), "
            "and here they run on the CPU: set model.quantization = 'none', or run.client_gpus above 0 on a GPU machine"
        )
    return cpus, per_client


def ray_address(cfg: Config) -> str:
    """The Ray cluster the run joins: ``run.ray_address``, else Ray's own ``RAY_ADDRESS``; empty: none."""
    return cfg["run.ray_address"] or os.environ.get("RAY_ADDRESS", "")


def backend_config(cfg: Config, cores: int | None = None, gpus: int | None = None) -> dict:
    """Flower's Ray backend settings for this run (``cores`` and ``gpus``: the machine's, found when not given).

    Joining an existing cluster (``ray_address``), the cluster's nodes have the cores and GPUs: a client holds
    ``run.client_cpus`` (1 when 0) and ``run.client_gpus`` ('auto': one where this machine has CUDA), and Ray
    places clients over every node with room. The nodes' own environment decides whether Ray hides GPUs from a
    client holding none (``_gpus_hidden_from_cpu_clients``): start them with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1.
    """
    cores = cores or os.cpu_count() or 1
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    quiet = {"logging_level": "ERROR", "log_to_driver": True}
    address = ray_address(cfg)
    if address:
        return {
            "client_resources": {
                "num_cpus": cfg["run.client_cpus"] or 1.0,
                "num_gpus": _gpus_per_client(cfg["run.client_gpus"], gpus),
            },
            "init_args": {"address": address, **quiet},
        }
    cpus, per_client = client_resources(cfg, cores, gpus)
    return {
        "client_resources": {"num_cpus": cpus, "num_gpus": per_client},
        # "local": a Ray of this run's own, even where `ray start` left a cluster that ray.init() would join.
        "init_args": {"address": "local", "num_cpus": cores, "num_gpus": gpus, "include_dashboard": False, **quiet},
    }


_OVERRIDE_ON_ZERO = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


@contextlib.contextmanager
def _gpus_hidden_from_cpu_clients():
    """Ray hides the GPUs from an actor that holds none (CUDA_VISIBLE_DEVICES=""), so a client given 0 GPUs runs
    on the CPU and one given a GPU sees only its own: each client picks "cuda" exactly when it holds a GPU.
    Ray says it will stop doing that for actors with 0 GPUs; RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 keeps it (and
    Ray's notice about the change, which asks for 0, is silenced: 0 would let every CPU client onto GPU 0)."""
    name = _OVERRIDE_ON_ZERO
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


RAY_RECORD = "ray-processes.json"  # in the run folder while its Ray may be running: the root its processes use
_RAY_ROOT_PREFIX = "fedrouter-ray-"


@contextlib.contextmanager
def _ray_ends_with_run(backend: dict, run_dir: Path):
    """Give the run's own Ray (``address = "local"``) a fresh root and a watcher that ends its processes when
    this process ends, however (see the module's docstring). A run that joins a cluster starts no Ray process."""
    if backend["init_args"].get("address") != "local" or os.name != "posix":
        yield
        return
    import psutil

    # Short and in /tmp (or RAY_TMPDIR): Ray's Unix sockets live below it and their paths are limited to ~107 bytes.
    root = tempfile.mkdtemp(prefix=_RAY_ROOT_PREFIX, dir=os.environ.get("RAY_TMPDIR") or "/tmp")
    backend["init_args"]["_temp_dir"] = root
    me = psutil.Process()
    watcher = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fedrouter.simulation import watch; watch(*sys.argv[1:])",
         str(run_dir / RAY_RECORD), str(me.pid), repr(me.create_time()), root],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    from fedrouter.runlog import write_json

    try:
        watcher_started = psutil.Process(watcher.pid).create_time()
    except psutil.Error:  # it ended at once: the record below still lets the next run clean up
        watcher_started = None
    record = {"pid": me.pid, "started": me.create_time(), "ray_root": root}
    write_json(run_dir / RAY_RECORD, record | {"watcher": watcher.pid, "watcher_started": watcher_started})
    try:
        yield
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():  # Flower shuts Ray down when the run ends; not on every error
            with contextlib.suppress(Exception):
                ray.shutdown()
        with contextlib.suppress(OSError):
            watcher.stdin.write(b"done\n")
            watcher.stdin.close()
        try:
            watcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.warning("the Ray watcher (pid %d) did not finish within 60s; it goes on alone", watcher.pid)


def watch(record: str, pid: str, started: str, root: str) -> None:
    """The watcher process: waits until the run's process ``pid`` ends (or says it is done on stdin), then ends
    every process using the run's Ray root, removes the root and the record. Ctrl-C and a closed terminal, which
    reach the run's whole process group, leave it running: it must outlive the run to clean up after it."""
    import select

    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while not select.select([sys.stdin], [], [], 1.0)[0] and _alive(int(pid), float(started)):
        pass
    reap_ray_root(root, exclude={int(pid)})
    Path(record).unlink(missing_ok=True)


def _alive(pid: int | None, started: float | None) -> bool:
    """Whether process ``pid`` (started at ``started``, so a reused PID does not count) still runs."""
    import psutil

    if not isinstance(pid, int) or not isinstance(started, int | float):
        return False
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, TypeError, ValueError):
        return False


def _is_ray_root(root: str) -> bool:
    path = Path(root)
    return path.is_absolute() and path.name.startswith(_RAY_ROOT_PREFIX) and len(path.parts) > 2


def ray_root_processes(root: str, exclude: set[int] = frozenset()) -> list:
    """This user's processes that hold a file below ``root`` or name it in their command line (psutil)."""
    import psutil

    below = root.rstrip(os.sep) + os.sep
    found = []
    for proc in psutil.process_iter():
        if proc.pid in exclude or proc.pid == os.getpid():
            continue
        try:
            if any(below in arg or arg == root for arg in proc.cmdline()) or any(
                f.path.startswith(below) for f in proc.open_files()
            ):
                found.append(proc)
        except psutil.Error:  # gone, a zombie, or another user's (which this user could not signal anyway)
            continue
    return found


def reap_ray_root(root: str, exclude: set[int] = frozenset()) -> list[int]:
    """End the processes that use the Ray root ``root`` (SIGTERM, SIGKILL after 5 s), then remove it; their PIDs."""
    import psutil

    if not _is_ray_root(root):  # only a root this module made: never signal by what a record claims elsewhere
        return []
    ended: list[int] = []
    for _ in range(3):  # a raylet still alive may start a process while the others end
        procs = ray_root_processes(root, exclude)
        if not procs:
            break
        ended += [proc.pid for proc in procs]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
            _, procs = psutil.wait_procs(procs, timeout=5)
            if not procs:
                break
    shutil.rmtree(root, ignore_errors=True)
    return ended


def reap_leftovers(folder: Path) -> list[int]:
    """End the Ray processes of killed runs in ``folder``'s run folders whose watcher is gone too; their PIDs.

    A record whose run or watcher still runs is left alone (that run, or its watcher, is in charge)."""
    ended: list[int] = []
    for record in Path(folder).glob(f"*/{RAY_RECORD}"):
        try:
            info = json.loads(record.read_text())
            root = str(info["ray_root"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _alive(info.get("pid"), info.get("started")) or _alive(info.get("watcher"), info.get("watcher_started")):
            continue
        ended += reap_ray_root(root, exclude={os.getpid()})
        record.unlink(missing_ok=True)
    return ended


def run_experiment(cfg: Config, run_dir: Path | None = None, on_start=None, client_app=None) -> tuple[Path, dict]:
    """Run a whole experiment in simulation; returns the run folder and its metrics.

    With ``run.resume`` set, the run goes on from that folder's checkpoint (``run_dir`` is ignored).
    ``on_start(run_dir)`` is called before the simulation starts (the CLI uses it to follow progress).
    ``client_app`` replaces FedRouter's ClientApp (tests use it to play misbehaving clients).
    Raises ``RuntimeError`` when the run did not finish, with the reason the server recorded.
    """
    # Imported here: flwr's simulation runtime and torch are heavy and only needed for a run.
    from flwr.simulation import run_simulation

    from fedrouter.federated.app import client_app as fedrouter_client_app
    from fedrouter.federated.app import make_server_app

    check_inputs(cfg)
    backend = backend_config(cfg)  # a resource setting the machine cannot meet fails here, before any folder
    if cfg["run.resume"]:
        run_dir = Path(cfg["run.resume"])
        check_resumable(run_dir)
    else:
        run_dir = Path(run_dir or default_run_dir(cfg))
        if (run_dir / METRICS).exists():
            raise FileExistsError(f"run folder {run_dir} already holds a run; choose another run.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    reaped = reap_leftovers(run_dir.parent)  # Ray processes of an earlier run here that was killed with its watcher
    if reaped:
        log.warning("ended %d leftover Ray processes of killed runs in %s", len(reaped), run_dir.parent)
    if on_start is not None:
        on_start(run_dir)
    with _ray_ends_with_run(backend, run_dir), _gpus_hidden_from_cpu_clients(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # `run_simulation` is Flower's deprecated Python entry point. It is the one that runs the simulation
        # inside this process: `flwr run .` (also supported, see pyproject.toml) needs a packaged app and
        # starts a SuperLink that outlives the run. The ServerApp/ClientApp are the same in both.
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=client_app or fedrouter_client_app,
            num_supernodes=cfg["data.num_clients"],
            backend_config=backend,
        )
    return run_dir, finished_metrics(run_dir)


def check_inputs(cfg: Config) -> None:
    """Fail fast, before any process starts: every client's data split and the model name must be usable.

    The clients check again in their own processes (in a deployment they hold the data); this only moves
    the clear error to the front.
    """
    from fedrouter.data import all_clients
    from fedrouter.model.loading import check_model_name
    from fedrouter.tracking import check_installed

    if cfg["data.num_clients"] == 0:  # 0 sizes the run to a federation; here the run makes the federation
        raise ConfigError(
            "setting 'data.num_clients' = 0 (as many clients as the federation has) works only under `flwr run`; "
            "`fedrouter run` starts one simulated client per data partition: set data.num_clients to a number"
        )
    all_clients(cfg)
    check_model_name(cfg["model.name"])
    check_installed(cfg["run.report_to"])


def check_resumable(run_dir: Path) -> None:
    """A run folder can be resumed when it holds a checkpoint and its last attempt did not finish."""
    from fedrouter.errors import ConfigError
    from fedrouter.federated.checkpoint import CHECKPOINT

    if not (run_dir / CHECKPOINT).is_file():
        raise ConfigError(f"setting 'run.resume': {run_dir} holds no {CHECKPOINT} (not a run folder, or stopped early)")
    if any(e["event"] == "done" for e in _last_attempt(run_dir)):
        raise ConfigError(f"setting 'run.resume': the run in {run_dir} already finished")


def _last_attempt(run_dir: Path) -> list[dict]:
    """The events since the last start (a resumed run appends to the same stream)."""
    from fedrouter.runlog import EVENTS, read_events

    events, _ = read_events(run_dir / EVENTS)
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    return events[starts[-1] :] if starts else events


def finished_metrics(run_dir: Path) -> dict:
    """The run's final metrics, or an error naming why the run did not finish (flwr may not raise)."""
    import json

    from fedrouter.runlog import EVENTS

    events = _last_attempt(run_dir)
    failed = [e for e in events if e["event"] == "failed"]
    if failed:
        raise RuntimeError(f"run failed: {failed[-1].get('error')}")
    if not any(e["event"] == "done" for e in events):
        raise RuntimeError(f"run did not finish (no 'done' event in {run_dir / EVENTS}); see {run_dir / 'log.txt'}")
    from fedrouter.run_metrics import checked

    return checked(json.loads((run_dir / METRICS).read_text()), run_dir / METRICS)
