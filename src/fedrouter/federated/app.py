"""The Flower app: ``flwr run .`` loads ``server_app`` and ``client_app`` from here (see pyproject.toml)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrouter.config import Config, ConfigError
from fedrouter.federated.client import app as client_app
from fedrouter.federated.server import run_fedrouter
from fedrouter.runlog import default_run_dir


def make_server_app(cfg: Config | None = None, run_dir=None) -> ServerApp:
    """A ServerApp for a fixed config (``fedrouter run``), or one that reads the Flower run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg
        if config is None:
            try:
                config = Config(dict(context.run_config), where="Flower run config")
            except ConfigError as err:
                raise SystemExit(str(err)) from None
        run_fedrouter(grid, config, run_dir or default_run_dir(config))

    return app


server_app = make_server_app()

__all__ = ["client_app", "make_server_app", "server_app"]
