"""A run folder: resolved config, an event stream (for progress displays), a log and metrics files.

Files are replaced atomically (written beside, then renamed), so a crash never leaves a half-written
result behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fedrouter.config import Config
from fedrouter.tracking import Tracking

log = logging.getLogger("fedrouter")

EVENTS = "events.jsonl"
METRICS = "metrics.json"
CONFIG = "config.toml"
LOG = "log.txt"


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write beside ``path``, flush to disk, then rename over it: readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def default_run_dir(cfg: Config) -> Path:
    name = cfg["run.name"] or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg['data.scenario']}-seed{cfg['run.seed']}"
    return Path(cfg["run.output_dir"]).expanduser() / name


class RunFolder:
    """Where one run writes everything; ``event`` appends to the stream that progress displays follow, and
    every metrics save is mirrored to the trackers ``run.report_to`` names (``resumed``: going on from a
    checkpoint, whose figures were logged before)."""

    def __init__(self, path: Path, cfg: Config, resumed: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / CONFIG, cfg.replace(run__resume="").to_toml())  # re-runnable as a new run
        self._events = open(path / EVENTS, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        self._handler = logging.FileHandler(path / LOG, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(self._handler)
        log.setLevel(logging.INFO)
        self.started = time.time()
        self.tracking = Tracking(cfg["run.report_to"], path, cfg.to_dict(), resumed)

    def event(self, kind: str, **fields: Any) -> None:
        record = {"t": round(time.time() - self.started, 3), "event": kind, **fields}
        self._events.write(json.dumps(record, default=_plain) + "\n")
        self._events.flush()
        if kind not in ("reply",):
            log.info("%s %s", kind, json.dumps(fields, default=_plain))

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.path / METRICS, metrics)
        self.tracking.update(metrics)

    def close(self) -> None:
        self.tracking.close()
        self._events.close()
        log.removeHandler(self._handler)
        self._handler.close()


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete event lines after byte ``offset``; returns the events and the new offset."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    events = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
    return events, offset + end
