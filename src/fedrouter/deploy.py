"""A real Flower deployment on this machine: one SuperLink and N SuperNodes as separate processes, on loopback.

``LocalDeployment`` starts ``flower-superlink`` and ``flower-supernode`` (each in its own process group, logs
in the deployment folder), submits a FedRouter run with ``flwr run`` and judges it by the run folder (``flwr
run`` can exit 0 for a failed run), and stops every process it started, children included. Each SuperNode
holds only its own data: its partition of ``data.source`` (node config ``client-id``) or its own files
(``data-path``). With ``tls=True`` it makes a certificate authority and a server certificate for 127.0.0.1 and
every connection (SuperNodes, ``flwr``) checks it; with ``auth=True`` the SuperLink admits only SuperNodes whose
public keys were registered (``flwr supernode register``), each node signing in with its private key.

The Flower app that ``flwr run`` submits is generated in the deployment folder: a ``pyproject.toml`` naming
FedRouter's ServerApp and ClientApp, with the run's settings as its run config. The SuperLink and SuperNodes
run it in this Python environment (runtime dependency installation is off).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedrouter.config import SETTINGS, Config, toml_value
from fedrouter.runlog import EVENTS, default_run_dir, read_events

CONNECTION = "fedrouter-local"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    """A Flower command of this environment (beside this Python), so every process runs the same code."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def make_certificates(folder: Path, host: str = HOST) -> dict[str, Path]:
    """A self-signed CA and a server certificate for ``host`` (and localhost), valid for 30 days."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, issuer: x509.Name | None, key, signer, extension, critical: bool):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(extension, critical=critical)
            .sign(signer, hashes.SHA256())
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("FedRouter local CA", None, ca_key, ca_key, x509.BasicConstraints(ca=True, path_length=None), True)
    names = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")])
    server = certificate(host, ca.subject, key, ca_key, names, False)
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)
    return paths


def make_node_keys(folder: Path, count: int) -> list[tuple[Path, Path]]:
    """One ECDSA (P-384) key pair per SuperNode in OpenSSH format, as Flower's SuperNode authentication reads."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = folder / f"supernode-{i}", folder / f"supernode-{i}.pub"
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        private.chmod(0o600)
        public.write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
        pairs.append((private, public))
    return pairs


def write_app(folder: Path, cfg: Config) -> Path:
    """A Flower app folder for ``flwr run``: FedRouter's components, ``cfg`` as the run config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{key} = {toml_value(cfg[key])}" for key in SETTINGS)
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedrouter-run"
version = "1.0.0"
description = "A FedRouter run (generated by fedrouter deploy-local)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedrouter"

[tool.flwr.app.components]
serverapp = "fedrouter.federated.app:server_app"
clientapp = "fedrouter.federated.app:client_app"

[tool.flwr.app.config]
{config}
"""
    )
    return folder


@dataclass
class LocalDeployment:
    """SuperLink + ``nodes`` SuperNodes on loopback; use as a context manager so that ``stop`` always runs."""

    folder: Path
    nodes: int
    tls: bool = False
    auth: bool = False  # SuperNode authentication: only registered public keys may connect
    data_paths: list[Path] | None = None  # one folder or file per node; None: partitions of data.source
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        if self.data_paths is not None and len(self.data_paths) != self.nodes:
            raise ValueError(f"{len(self.data_paths)} data paths for {self.nodes} nodes (expected one per node)")
        self.home = self.folder / "flwr-home"
        self.certs = make_certificates(self.folder / "certs") if self.tls else None
        self.keys = make_node_keys(self.folder / "keys", self.nodes) if self.auth else None

    # --- processes -----------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 (the child process keeps it)
        proc = subprocess.Popen(
            command, cwd=self.folder, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.processes[name] = proc
        return proc

    def _security(self, server: bool) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if server:
            return [
                "--ssl-ca-certfile", str(self.certs["ca"]),
                "--ssl-certfile", str(self.certs["cert"]),
                "--ssl-keyfile", str(self.certs["key"]),
            ]  # fmt: skip
        return ["--root-certificates", str(self.certs["ca"])]

    def start(self, timeout: float = 60.0) -> LocalDeployment:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "superlink",
            [_tool("flower-superlink"), *self._security(True), "--host", HOST, "--port", str(self.port),
             "--disable-runtime-dependency-installation", "--database", str(self.folder / "superlink.db"),
             *(["--enable-supernode-auth"] if self.keys else [])],
        )  # fmt: skip
        self._wait_for_port(self.port, "superlink", timeout)
        self._connection()
        for _, public in self.keys or []:
            self._register(public)
        for i in range(self.nodes):
            self.start_node(i)
        return self

    def _register(self, public: Path) -> None:
        """``flwr supernode register``: the SuperLink admits a SuperNode holding the matching private key."""
        done = subprocess.run(
            [_tool("flwr"), "supernode", "register", str(public), CONNECTION],
            cwd=self.folder, env=self._env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public} failed: {done.stdout[-1000:]}{done.stderr[-1000:]}")

    def start_node(self, i: int, private_key: Path | None = None, name: str = "") -> subprocess.Popen:
        """SuperNode ``i`` (client id ``i``); started again after ``kill_node`` it joins as a new node.

        ``private_key`` replaces the node's registered key (to try one the SuperLink does not know).
        """
        key = private_key or (self.keys[i][0] if self.keys else None)
        auth = ["--auth-supernode-private-key", str(key)] if key else []
        node_config = f"client-id={i}"
        if self.data_paths is not None:
            node_config += f' data-path="{Path(self.data_paths[i]).resolve()}"'
        return self._spawn(
            name or f"supernode-{i}",
            [_tool("flower-supernode"), *self._security(False), "--superlink", f"{HOST}:{self.port}",
             "--port", str(free_port()), "--node-config", node_config, "--max-retries", "5", *auth],
        )  # fmt: skip

    def _wait_for_port(self, port: int, name: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited at start; see {self.folder / (name + '.log')}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not open port {port} within {timeout:.0f}s")

    def family(self, name: str | None = None) -> list[psutil.Process]:
        """The processes started here (or one of them) and all their descendants."""
        found: list[psutil.Process] = []
        for key, proc in self.processes.items():
            if name is not None and key != name:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.pid)
                found += [parent, *parent.children(recursive=True)]
        return found

    def kill_node(self, i: int) -> None:
        """Kill SuperNode ``i`` and its ClientApp processes at once (a machine that dies)."""
        self._end(self.family(f"supernode-{i}"), signal.SIGKILL)
        self.processes.pop(f"supernode-{i}")

    def stop(self) -> None:
        """Stop every process started here, children included: SIGTERM, then SIGKILL after 15 s."""
        family = self.family()
        for proc in self.processes.values():  # the process groups, in case a child is not yet visible
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        self._end(family, signal.SIGTERM)
        self.processes.clear()

    @staticmethod
    def _end(processes: list[psutil.Process], sig: int) -> None:
        for proc in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(processes, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- runs ----------------------------------------------------------------------------------------------
    def _connection(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{CONNECTION}"',
            "",
            f"[superlink.{CONNECTION}]",
            f'address = "{HOST}:{self.port}"',
        ]
        lines.append(f'root-certificates = "{self.certs["ca"]}"' if self.certs else "insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def submit(self, cfg: Config) -> tuple[subprocess.Popen, Path]:
        """Start ``flwr run`` for ``cfg`` (not waiting); returns the process and the run folder."""
        if cfg["data.num_clients"] != self.nodes:
            raise ValueError(
                f"'data.num_clients' is {cfg['data.num_clients']} but the deployment has {self.nodes} nodes"
            )
        output = Path(cfg["run.output_dir"]).expanduser().resolve()
        name = cfg["run.name"] or default_run_dir(cfg).name
        cfg = cfg.replace(run__output_dir=str(output), run__name=name)
        run_dir = Path(cfg["run.resume"]) if cfg["run.resume"] else output / name
        app = write_app(self.folder / "app" / name, cfg)
        self._connection()
        log = open(self.folder / f"flwr-run-{name}.log", "ab")  # noqa: SIM115 (the child process keeps it)
        proc = subprocess.Popen(
            [_tool("flwr"), "run", str(app), CONNECTION, "--stream"],
            cwd=self.folder, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.processes[f"flwr-run-{name}"] = proc
        return proc, run_dir

    def run(self, cfg: Config, timeout: float = 3600.0) -> tuple[Path, dict]:
        """Run ``cfg`` on the deployment and wait for the server's verdict (the run folder's events)."""
        from fedrouter.simulation import finished_metrics

        proc, run_dir = self.submit(cfg)
        wait_for_run(run_dir, timeout, proc)
        return run_dir, finished_metrics(run_dir)


def wait_for_run(run_dir: Path, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until the run folder's last attempt ends (``done`` or ``failed``); ``flwr run`` may return before."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        events, _ = read_events(Path(run_dir) / EVENTS)
        starts = [i for i, e in enumerate(events) if e["event"] == "start"]
        last = events[starts[-1] :] if starts else []
        if any(e["event"] in ("done", "failed") for e in last):
            return
        if proc is not None and proc.poll() is not None and proc.returncode != 0 and not last:
            raise RuntimeError(f"flwr run exited with {proc.returncode} before the run started")
        time.sleep(0.5)
    raise RuntimeError(f"the run in {run_dir} did not end within {timeout:.0f}s")
