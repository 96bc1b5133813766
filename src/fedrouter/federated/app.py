"""The Flower app: ``flwr run .`` loads ``server_app`` and ``client_app`` from here (see pyproject.toml)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrouter.config import Config
from fedrouter.federated.client import app as client_app
from fedrouter.federated.server import run_fedrouter
from fedrouter.runlog import default_run_dir

log = logging.getLogger("fedrouter")


def _show_progress_in_flower_logs() -> None:
    """Under ``flwr run`` nobody configured logging: send fedrouter's events to Flower's log stream."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedrouter: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def make_server_app(cfg: Config | None = None, run_dir=None) -> ServerApp:
    """A ServerApp for a fixed config (``fedrouter run``), or one that reads the Flower run config.

    With ``run.resume`` set, the run goes on from that run folder's checkpoint.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg
        if config is None:
            _show_progress_in_flower_logs()
            try:
                config = Config(dict(context.run_config), where="Flower run config")
            except Exception:
                log.exception("invalid run config")
                raise
        resume = bool(config["run.resume"])
        target = run_dir or (Path(config["run.resume"]) if resume else default_run_dir(config))
        log.info("run folder: %s%s", target, " (resuming)" if resume else "")
        run_fedrouter(grid, config, target, resume=resume)

    return app


server_app = make_server_app()

__all__ = ["client_app", "make_server_app", "server_app"]
