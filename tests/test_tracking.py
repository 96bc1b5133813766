"""``run.report_to``: a real tiny run reports to TensorBoard, MLflow and W&B (offline), read back with each
library's own reader and compared with the run's ``metrics.json``; a broken tracker never stops a run."""

import json
import math
import struct
import subprocess
import sys

import pytest

from fedrouter.config import load_config
from fedrouter.errors import ConfigError
from fedrouter.tracking import numbers, parameters, scalars

CLI = (sys.executable, "-m", "fedrouter.cli")
TINY = ["--quiet", "--model", "tiny-random", "--clients", "2", "--rounds", "2"]
SETTINGS = ["data.train_per_client=8", "eval.max_new_tokens=2", "eval.sets=personalized"]


def _run(tmp_path, name: str, report_to: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    done = subprocess.run(
        [*CLI, "run", *TINY, "--output", str(tmp_path), "--name", name, *SETTINGS, f"run.report_to={report_to}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 2-client, 2-round run of the tiny model reporting to all three trackers."""
    tmp = tmp_path_factory.mktemp("tracking")
    _run(tmp, "all", "tensorboard,mlflow,wandb")
    run_dir = tmp / "all"
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def _expected(metrics: dict) -> dict[tuple[str, int], float]:
    """What every tracker must hold, by hand from metrics.json: (tag, step) -> value."""
    want = {}
    for record in metrics["rounds"]:
        step = record["round"]
        want[("lr", step)] = record["lr"]
        want[("bytes_up", step)] = record["bytes_up"]
        for adapter, loss in record["train_loss"].items():
            want[(f"train_loss/{adapter}", step)] = loss
        for client, losses in record["client_loss"].items():
            for adapter, loss in losses.items():
                want[(f"client_loss/{client}/{adapter}", step)] = loss
    want[("clustering/global_k", 0)] = metrics["clustering"]["global_k"]
    for client, k in metrics["clustering"]["local_k"].items():
        want[(f"clustering/local_k/{client}", 0)] = k
    want[("phases/embed_s", 0)] = metrics["phases"]["embed_s"]
    last = metrics["rounds"][-1]["round"]
    for name, summary in metrics["evaluation"]["by_set"].items():
        want[(f"evaluation/by_set/{name}/rouge1", last)] = summary["rouge1"]
        for task, scores in summary["per_task"].items():
            want[(f"evaluation/by_set/{name}/per_task/{task}/rouge1", last)] = scores["rouge1"]
    want[("bytes/up_total", last)] = metrics["bytes"]["up_total"]
    return want


def _every_scalar(metrics: dict) -> set[tuple[str, int]]:
    return {(name, step) for step, tags in scalars(metrics, 0, False) for name in tags}


def _check(got: dict[tuple[str, int], float], metrics: dict, rel: float) -> None:
    for key, value in _expected(metrics).items():
        assert key in got, f"{key} not logged"
        assert math.isclose(got[key], value, rel_tol=rel, abs_tol=1e-9), f"{key}: {got[key]} != {value}"
    assert set(got) == _every_scalar(metrics)  # nothing more, nothing less than metrics.json holds


def test_tensorboard_holds_the_runs_figures(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics = run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    got = {(name, e.step): e.value for name in events.Tags()["scalars"] for e in events.Scalars(name)}
    _check(got, metrics, rel=1e-6)  # TensorBoard keeps scalars as float32
    assert events.PluginTagToContent("hparams")  # the settings, as the HParams plugin's experiment


def test_mlflow_holds_the_runs_figures_and_settings(run):
    from mlflow.tracking import MlflowClient

    run_dir, metrics = run
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    logged = client.get_run(run_id)
    assert logged.info.run_name == "all" and logged.info.status == "FINISHED"
    assert (
        logged.data.params["run.rounds"] == "2"
        and logged.data.params["run.report_to"] == metrics["config"]["run.report_to"]
    )
    got = {(name, m.step): m.value for name in logged.data.metrics for m in client.get_metric_history(run_id, name)}
    _check(got, metrics, rel=1e-12)


def _wandb_records(path):
    """The records of a W&B run file. wandb's Python reader of these files left with its Go core (0.2x), so
    the framing (LevelDB log: 7-byte file header, 32 KiB blocks, records of crc32, length, type) is read here and
    each record parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_runs_figures_and_settings(run):
    run_dir, metrics = run
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    got, config = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if not name.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                    got[(name, step)] = float(json.loads(item.value_json))
        elif kind == "run":
            update = record.run.config.update
            config = {i.key: json.loads(i.value_json) for i in update if i.key != "_wandb"}  # wandb's own
    _check(got, metrics, rel=1e-12)
    assert config == parameters(metrics["config"]) and config["run.rounds"] == 2


def test_a_broken_tracker_warns_and_the_run_finishes(tmp_path):
    """MLflow pointed at a store it cannot open: the run ends as usual, with its metrics and one warning."""
    done = _run(tmp_path, "broken", "mlflow,tensorboard", {"MLFLOW_TRACKING_URI": "unknownscheme://nowhere"})
    metrics = json.loads((tmp_path / "broken" / "metrics.json").read_text())
    assert "evaluation" in metrics
    log = (tmp_path / "broken" / "log.txt").read_text()
    assert "tracking: mlflow failed and is switched off" in log, done.stderr[-2000:]
    assert "tracking: mlflow, tensorboard closed in" in log  # the run waited for them once, at its end
    assert (tmp_path / "broken" / "tensorboard").is_dir()  # the other tracker went on


def test_a_resumed_run_logs_only_what_is_new():
    before = {"clustering": {"global_k": 2}, "rounds": [{"round": 1, "lr": 0.1, "train_loss": {"a": 1.0}}]}
    after = {**before, "rounds": [*before["rounds"], {"round": 2, "lr": 0.05, "train_loss": {"a": 0.5}}]}
    steps = scalars(after, rounds_logged=1, clustering_logged=True)
    assert steps == [(2, {"lr": 0.05, "rejected": 0.0, "train_loss/a": 0.5})]


def test_tags_are_paths_in_metrics_json_that_every_tracker_accepts():
    assert dict(numbers({"per_task": {"q&a (v2)": {"rouge1": 3}, "flag": True, "none": None}}, "e")) == {
        "e/per_task/q_a _v2_/rouge1": 3.0
    }


def test_report_to_names_known_trackers_only():
    assert load_config(overrides={"run.report_to": "tensorboard, wandb"})["run.report_to"] == "tensorboard, wandb"
    with pytest.raises(ConfigError, match="run.report_to"):
        load_config(overrides={"run.report_to": "tensorbored"})
