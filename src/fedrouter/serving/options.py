"""How ``fedrouter serve`` serves: every limit and setting in one typed object, validated once.

The command line builds a ``ServeOptions`` from its flags (``ServeOptions.of(vars(args))``: each field is read by
its own name, so a field without a flag fails at once), and the same object goes through ``create_app`` to the
``Engine``; no limit is read, defaulted or checked anywhere else. The HTTP server's own limits (header size, idle
connections, open connections, shutdown) follow from it too (``ServeOptions.uvicorn``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from fedrouter.errors import ConfigError

BACKENDS = ("local", "vllm")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# uvicorn's limits, fixed: what a connection may hold before the app sees a request
MAX_HEADER_BYTES = 64 * 1024  # the request line and headers; past it, 400 (a 50 MiB header is refused, not held)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
SHUTDOWN_S = 10  # on SIGTERM, requests still open after this are cancelled and the process exits
SPARE_CONNECTIONS = 64  # connections beyond max_queue (health checks, the playground, idle keep-alives)


@dataclass(frozen=True)
class ServeOptions:
    """The settings of one server, each checked here; a bad value is a ``ConfigError`` with one line per value.

    Parameters
    ----------
    host : str, default "127.0.0.1"
        Address to listen on (loopback only unless changed).
    port : int, default 8000
        Port to listen on, 1 to 65535.
    api_key : str or None, default None
        When set, every ``/v1/`` request needs ``Authorization: Bearer <api_key>``.
    max_batch : int, default 16
        Most requests decoded together in one batch (rows).
    max_queue : int, default 64
        Most requests waiting or being answered; past it a request gets 429.
    max_batch_tokens : int, default 8192
        Most padded positions in one batch: rows x the longest (prompt + max_tokens) stays within it when a
        request joins; a request wider than this alone still runs, alone.
    backend : {"local", "vllm"}, default "local"
        Who generates: this process, or a vLLM server (this process then only embeds and routes).
    vllm_url : str or None, default None
        The vLLM server's base URL; set exactly when ``backend`` is "vllm".
    vllm_model : str or None, default None
        The base model's name on the vLLM server (None: the artifact's recorded one).
    request_timeout : float, default 30
        Seconds a connection has to deliver a whole request (line, headers and body) from when it opened or
        from the request's first byte; past it the connection is closed (``transport.TimedH11Protocol``).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_batch_tokens: int = 8192
    backend: str = "local"
    vllm_url: str | None = None
    vllm_model: str | None = None
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        problems = [
            *(_at_least_one(self, name) for name in ("max_batch", "max_queue", "max_batch_tokens")),
            _port(self.port),
            _seconds(self.request_timeout),
            None if isinstance(self.host, str) and self.host else f"host {self.host!r}: expected an address",
            None if self.api_key is None or self.api_key else "api_key (--api-key): must not be empty when given",
            None if self.backend in BACKENDS else f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}",
            None
            if (self.backend == "vllm") == bool(self.vllm_url)
            else "--vllm-url goes with --backend vllm, and --backend vllm needs --vllm-url",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ConfigError("\n".join(problems))

    @classmethod
    def of(cls, values: Mapping[str, object]) -> ServeOptions:
        """The options from a mapping holding every field by name (``vars(args)`` of the serve command): a
        field missing from it is a ``KeyError`` naming it, so no option can be left behind."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def uvicorn(self) -> dict[str, object]:
        """The keyword arguments of ``uvicorn.run`` that bound what clients can hold: h11 (pure Python, whose
        header limit holds; httptools' has none) with headers up to ``MAX_HEADER_BYTES`` and each request's
        arrival within ``request_timeout`` (``transport.TimedH11Protocol``), idle connections closed after
        ``KEEP_ALIVE_S``, at most ``max_queue + SPARE_CONNECTIONS`` connections or requests at once (past it
        uvicorn answers 503 itself), and a shutdown that waits ``SHUTDOWN_S`` at most."""
        from fedrouter.serving.transport import timed_protocol

        return {
            "host": self.host,
            "port": self.port,
            "http": timed_protocol(self.request_timeout),
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
            "timeout_keep_alive": KEEP_ALIVE_S,
            "limit_concurrency": self.max_queue + SPARE_CONNECTIONS,
            "timeout_graceful_shutdown": SHUTDOWN_S,
        }

    @property
    def exposed(self) -> bool:
        """Listening beyond loopback without an API key: anyone who reaches the port can use it."""
        return self.host not in LOOPBACK and not self.api_key


def _at_least_one(options: ServeOptions, name: str) -> str | None:
    value = getattr(options, name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return None
    return f"{name} (--{name.replace('_', '-')}) is {value!r}: expected a whole number of at least 1"


def _seconds(value: object) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 3600:
        return None
    return f"request_timeout (--request-timeout) is {value!r}: expected seconds above 0, at most 3600"


def _port(port: object) -> str | None:
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return None
    return f"port (--port) is {port!r}: expected 1 to 65535"
