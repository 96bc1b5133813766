"""The one registry of methods: the config's check, the CLI, the benchmark and its report all read it.

A method registers itself with ``@register`` where it is defined. Methods outside this package load as plugins,
chosen on the machine that runs them, never by a peer (a config received over the network only names a method):

- the ``fedrouter.methods`` entry point group of installed packages (``[project.entry-points."fedrouter.methods"]``
  ``mymethod = "mypackage.mymethod"``), and
- ``FEDROUTER_PLUGINS``: comma-separated module names or ``.py`` files, imported once per process. Set it where
  the server and every client run (a simulation's Ray workers inherit it from the process that starts them).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from fedrouter.errors import ConfigError

if TYPE_CHECKING:
    from fedrouter.config import Config
    from fedrouter.methods.base import Method

PLUGINS_ENV = "FEDROUTER_PLUGINS"
ENTRY_POINTS = "fedrouter.methods"

_methods: dict[str, type[Method]] = {}
_loaded: set[str] = set()


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method selectable as ``run.method = cls.name``."""
    name = cls.name
    if cls.kind not in KINDS:
        raise ValueError(f"method {name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
    if not isinstance(name, str) or not name.isidentifier() or not name.islower():
        raise ValueError(f"method name must be a lower-case identifier, got {name!r}")
    old = _methods.get(name)
    if old is not None and _origin(old) != _origin(cls):  # the same file imported twice registers again
        raise ValueError(f"method {name!r} is registered twice: {_origin(old)} and {_origin(cls)}")
    from fedrouter.config import add_settings

    add_settings(name, cls.settings)
    _methods[name] = cls
    return cls


def _origin(cls: type) -> tuple[str, str]:
    try:
        return inspect.getfile(cls), cls.__qualname__
    except TypeError:
        return cls.__module__, cls.__qualname__


def load_plugins() -> None:
    """Import the installed and the ``FEDROUTER_PLUGINS`` methods (each once)."""
    if ENTRY_POINTS not in _loaded:  # installed packages do not change while a process runs: look once
        _loaded.add(ENTRY_POINTS)
        for entry in entry_points(group=ENTRY_POINTS):
            entry.load()
    for item in filter(None, (part.strip() for part in os.environ.get(PLUGINS_ENV, "").split(","))):
        if item in _loaded:
            continue
        _loaded.add(item)
        try:
            if item.endswith(".py"):
                path = Path(item).resolve()
                spec = importlib.util.spec_from_file_location(f"fedrouter_plugin_{path.stem}", path)
                if spec is None or not path.is_file():
                    raise FileNotFoundError(f"no such file {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module  # as an import would: its classes know their file
                spec.loader.exec_module(module)
            else:
                importlib.import_module(item)
        except (ImportError, OSError) as err:
            raise ConfigError(f"{PLUGINS_ENV}: cannot load method plugin {item!r}: {err}") from None


KINDS = ("reference", "router", "upper bound", "baseline")


def methods() -> dict[str, type[Method]]:
    """Every registered method by name, in the benchmark's order: by ``kind`` (``KINDS``), then ``order``."""
    import fedrouter.methods  # noqa: F401  (the built-in methods register on import)

    load_plugins()
    ranked = sorted(_methods.values(), key=lambda m: (KINDS.index(m.kind), m.order, m.name))
    return {m.name: m for m in ranked}


def method_class(name: str) -> type[Method]:
    known = methods()
    if name not in known:
        from fedrouter.config import suggest

        raise ConfigError(
            f"unknown method {name!r}{suggest(name, list(known))}; expected one of {', '.join(known)} "
            f"(methods of your own: {PLUGINS_ENV})"
        )
    return known[name]


def make_method(cfg: Config) -> Method:
    return method_class(cfg["run.method"])(cfg)
