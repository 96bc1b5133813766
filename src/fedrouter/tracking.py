"""Experiment tracking: a run's figures mirrored into TensorBoard, MLflow and Weights & Biases (``run.report_to``).

The run's ``metrics.json`` is the one source. Each time the server saves it, ``Tracking.update`` turns what is new
in it into scalars named by their path in the file (``rounds[2].train_loss.cluster_0`` becomes the tag
``train_loss/cluster_0`` at step 3) and hands them to every tracker on a background thread, so a slow or broken
tracker never holds the run up: a tracker that raises is switched off with one warning and the run goes on.

Where each tracker writes, offline by default (the libraries' own environment variables win, as in
transformers' ``report_to``):

- ``tensorboard``: ``RUN/tensorboard`` (``tensorboard --logdir runs`` shows every run under ``runs``).
- ``mlflow``: ``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<run.output_dir>/mlflow.db`` (MLflow 3
  refuses its old ``./mlruns`` file store); experiment ``MLFLOW_EXPERIMENT_NAME`` or ``fedrouter``.
- ``wandb``: offline run files under ``RUN/wandb`` unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads
  them later); project ``WANDB_PROJECT`` or ``fedrouter``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedrouter.errors import ConfigError

log = logging.getLogger("fedrouter")

TRACKERS = ("tensorboard", "mlflow", "wandb")
# Import name and the extra that installs it, per tracker.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
STATE = "tracking.json"  # the trackers' run ids, so a resumed run goes on in the same tracker run
CLOSE_TIMEOUT_S = 120.0  # the most the end of a run waits for trackers to write what is queued

# Parts of metrics.json that are logged, and at which step: clustering before training, each round at its
# number, the final figures at the last round.
ROUND_FIELDS = ("lr", "seconds", "accepted", "train_loss", "client_loss", "adapter_norms", "bytes_up", "bytes_down")
CLUSTERING_FIELDS = ("clustering", "clustering_bytes_up", "clustering_bytes_down")
FINAL_FIELDS = ("evaluation", "bytes", "evaluation_s", "eval_tokens", "wall_s")
PHASES_BEFORE_TRAINING = ("embed_s", "local_cluster_s", "clustering_s")


def requested(value: str) -> list[str]:
    """The trackers a ``run.report_to`` value names ('none': none)."""
    names = [item.strip() for item in value.split(",") if item.strip()]
    return [] if names == ["none"] else names


def check_report_to(value: str) -> str | None:
    """The setting's check: 'none', or trackers from ``TRACKERS`` separated by commas."""
    names = [item.strip() for item in value.split(",") if item.strip()]
    if names == ["none"]:
        return None
    unknown = [name for name in names if name not in TRACKERS]
    if not names or unknown:
        return "'none' or a comma-separated list of " + ", ".join(TRACKERS)
    return None


def check_installed(report_to: str) -> None:
    """Fail before a run starts when a requested tracker's library is missing (not halfway, as a warning)."""
    for name in requested(report_to):
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"setting 'run.report_to' names {name}, which is not installed: pip install 'fedrouter[{extra}]'"
            )


def viewing(report_to: str, run_dir: Path) -> list[str]:
    """How to look at what each requested tracker wrote for the run in ``run_dir`` (a line each)."""
    lines = []
    for name in requested(report_to):
        if name == "tensorboard":
            lines.append(f"tensorboard --logdir {run_dir / 'tensorboard'}")
        elif name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            lines.append(f"mlflow ui --backend-store-uri sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}")
        elif name == "wandb" and os.environ.get("WANDB_MODE", "offline") == "offline":
            lines.append(f"wandb sync {run_dir / 'wandb'}/offline-run-*   (uploads the offline run)")
    return lines


def tag(path: str) -> str:
    """A tag every tracker accepts (MLflow allows letters, digits and ``_-. /:``): other characters become '_'."""
    return re.sub(r"[^\w\-. /:]", "_", path)


def numbers(tree: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """Every number in a nested dictionary, as (path joined by '/', value); booleans and None are skipped."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from numbers(value, f"{prefix}/{key}")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield tag(prefix), float(tree)


def scalars(metrics: Mapping[str, Any], rounds_logged: int, clustering_logged: bool) -> list[tuple[int, dict]]:
    """What is new in ``metrics`` since ``rounds_logged`` rounds (and the clustering, if logged): (step, tags)."""
    steps: list[tuple[int, dict]] = []
    if not clustering_logged and "clustering" in metrics:
        tags = dict(numbers({key: metrics[key] for key in CLUSTERING_FIELDS if key in metrics}, ""))
        phases = metrics.get("phases", {})
        tags |= dict(numbers({key: phases[key] for key in PHASES_BEFORE_TRAINING if key in phases}, "/phases"))
        steps.append((0, {key.lstrip("/"): value for key, value in tags.items()}))
    for record in metrics.get("rounds", [])[rounds_logged:]:
        fields = {key: record[key] for key in ROUND_FIELDS if key in record}
        fields["rejected"] = len(record.get("rejected", {}))
        if "eval" in record:
            fields["round_eval"] = record["eval"]
        steps.append((record["round"], {key.lstrip("/"): value for key, value in numbers(fields, "")}))
    if "evaluation" in metrics:
        fields = {key: metrics[key] for key in FINAL_FIELDS if key in metrics}
        fields["evaluation"] = {key: metrics["evaluation"][key] for key in ("by_set", "overall")}
        fields["phases"] = {"training_s": metrics.get("phases", {}).get("training_s", 0.0)}
        last = metrics["rounds"][-1]["round"] if metrics.get("rounds") else 0
        steps.append((last, {key.lstrip("/"): value for key, value in numbers(fields, "")}))
    return steps


def parameters(config: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """The run's settings as tracker parameters (every setting, by its dotted name)."""
    return {key: value for key, value in sorted(config.items()) if isinstance(value, str | int | float | bool)}


class Tracking:
    """The trackers of one run, fed from its metrics on a background thread.

    ``resumed``: the run goes on from a checkpoint; what its metrics already hold was logged by the first attempt
    (into the same tracker runs, whose ids ``tracking.json`` keeps).
    """

    def __init__(self, report_to: str, run_dir: Path, config: Mapping[str, Any], resumed: bool = False) -> None:
        self.names = requested(report_to)
        self.run_dir, self.config, self.resumed = run_dir, config, resumed
        self.rounds_logged: int | None = None  # None: not known until the first metrics arrive
        self.clustering_logged = False
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        if self.names:
            self._thread = threading.Thread(target=self._work, name="fedrouter-tracking", daemon=True)
            self._thread.start()

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Queue what is new in ``metrics`` (the dictionary the server just saved)."""
        if not self.names:
            return
        if self.rounds_logged is None:  # the first save of this process
            self.rounds_logged = len(metrics.get("rounds", [])) if self.resumed else 0
            self.clustering_logged = self.resumed
        for step, tags in scalars(metrics, self.rounds_logged, self.clustering_logged):
            self._queue.put((step, tags))
        self.rounds_logged = len(metrics.get("rounds", []))
        self.clustering_logged = self.clustering_logged or "clustering" in metrics

    def close(self) -> None:
        """Write what is queued (waiting at most ``CLOSE_TIMEOUT_S``), then close every tracker."""
        if self._thread is None:
            return
        started = time.perf_counter()
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("tracking: trackers still writing after %.0f s; the run does not wait longer", CLOSE_TIMEOUT_S)
        else:  # the one wait trackers add to a run (the rest happens beside it)
            log.info("tracking: %s closed in %.1f s", ", ".join(self.names), time.perf_counter() - started)

    def _work(self) -> None:
        state_path = self.run_dir / STATE
        state = json.loads(state_path.read_text()) if self.resumed and state_path.exists() else {}
        sinks = {}
        for name in self.names:
            sink = self._guard(name, lambda name=name: SINKS[name](self.run_dir, self.config, state.get(name)))
            if sink is not None:
                sinks[name] = sink
                state[name] = sink.run_id
        if sinks:
            state_path.write_text(json.dumps(state, indent=2) + "\n")
        while (item := self._queue.get()) is not None:
            for name, sink in list(sinks.items()):
                if self._guard(name, lambda sink=sink: sink.log(*item) or True) is None:
                    del sinks[name]
        for name, sink in sinks.items():
            self._guard(name, sink.close)

    @staticmethod
    def _guard(name: str, call):
        """``call()``, or None with a warning when the tracker fails (the run goes on without it)."""
        try:
            return call()
        except Exception as err:  # any tracker failure is the tracker's, never the run's
            log.warning("tracking: %s failed and is switched off for this run: %s", name, err)
            return None


class TensorBoardSink:
    """``torch.utils.tensorboard``'s writer; the settings as the HParams plugin's experiment."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_id: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.run_id = str(run_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=self.run_id)
        if run_id is None:  # a resumed run logged its settings the first time
            for summary in hparams(parameters(config), {}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, tags: dict[str, float]) -> None:
        for name, value in tags.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowSink:
    """MLflow's client API (not the fluent one: no process-wide active run, safe on this thread)."""

    BATCH = 1000  # MLflow's limit of metrics per log_batch call
    PARAMS_BATCH = 100  # and of parameters

    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.parent.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedrouter")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            params = [Param(key, str(value)) for key, value in parameters(config).items()]
            for start in range(0, len(params), self.PARAMS_BATCH):
                self.client.log_batch(run_id, params=params[start : start + self.PARAMS_BATCH])
        self.run_id, self.uri = run_id, uri

    def log(self, step: int, tags: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for name, value in tags.items()]
        for start in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + self.BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A W&B run, offline unless ``WANDB_MODE`` says otherwise; system metrics sampling is off."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fedrouter"),
            name=run_dir.name,
            dir=run_dir,
            id=run_id,
            resume="allow" if run_id else None,
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=parameters(config),
            settings=wandb.Settings(x_disable_stats=True, silent=True, console="off"),
        )
        self.run_id = self.run.id

    def log(self, step: int, tags: dict[str, float]) -> None:
        self.run.log(tags, step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "mlflow": MLflowSink, "wandb": WandbSink}
