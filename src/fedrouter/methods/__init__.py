"""Federated fine-tuning methods of one shape (``base.Method``), in one registry (``registry``).

Importing this package registers the built-in methods: every module of this folder but ``base`` and
``registry`` holds one. A method of your own needs no edit here: see ``registry``.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedrouter.methods.base import (
    PARTS,
    ClientClusters,
    Grouping,
    Job,
    Method,
    Serving,
    derived_seed,
    global_radii,
    part_of,
)
from fedrouter.methods.registry import load_plugins, make_method, method_class, methods, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "PARTS",
    "ClientClusters",
    "Grouping",
    "Job",
    "Method",
    "Serving",
    "derived_seed",
    "global_radii",
    "load_plugins",
    "make_method",
    "method_class",
    "methods",
    "part_of",
    "register",
]
