"""The Flower app: ``flwr run .`` loads ``server_app`` and ``client_app`` from here (see pyproject.toml)."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrouter.config import Config
from fedrouter.errors import FedRouterError, RunError
from fedrouter.federated.client import app as client_app
from fedrouter.federated.server import run_fedrouter
from fedrouter.federated.transport import fit_to_federation
from fedrouter.runlog import default_run_dir

log = logging.getLogger("fedrouter")


class _UserErrorsWithoutTraceback(logging.Filter):
    """Flower logs the exception that ends a ServerApp (or a deployed ClientApp's reply) with its traceback. For
    an error a user can cause (a setting, a federation that does not fit, a SuperNode beyond the clients, a run
    that could not go on) the message says what to change and the traceback only hides it: such a record keeps
    the message alone. Any other exception keeps its traceback. The run still fails: Flower marks it
    ``finished:failed`` (a client's error reply is rejected by the server)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FedRouterError | RunError):
            record.msg, record.args = f"{record.getMessage()}: {error}", None
            record.exc_info = record.exc_text = None
        return True


# Every process that loads this app (Flower's ServerApp, simulation and ClientApp processes) reports errors a
# user can fix by their message.
_flower_log = logging.getLogger("flwr")
if not any(isinstance(f, _UserErrorsWithoutTraceback) for f in _flower_log.filters):
    _flower_log.addFilter(_UserErrorsWithoutTraceback())


def _show_progress_in_flower_logs() -> None:
    """Under ``flwr run`` nobody configured logging: send fedrouter's events to Flower's log stream."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedrouter: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def make_server_app(cfg: Config | None = None, run_dir=None) -> ServerApp:
    """A ServerApp for a fixed config (``fedrouter run``), or one that reads the Flower run config.

    With the Flower run config (``flwr run``), the federation exists before the run: ``data.num_clients = 0``
    becomes its number of SuperNodes, and a simulation whose SuperNodes do not match fails at once
    (``fit_to_federation``). Any failure raises, so that Flower marks the run ``finished:failed``.
    With ``run.resume`` set, the run goes on from that run folder's checkpoint.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg
        if config is None:
            _show_progress_in_flower_logs()
            config = fit_to_federation(grid, Config(dict(context.run_config), where="Flower run config"))
        resume = bool(config["run.resume"])
        target = run_dir or (Path(config["run.resume"]) if resume else default_run_dir(config))
        log.info("run folder: %s%s", target, " (resuming)" if resume else "")
        run_fedrouter(grid, config, target, resume=resume)

    return app


server_app = make_server_app()

__all__ = ["client_app", "make_server_app", "server_app"]
