"""Federated fine-tuning methods of one shape: FedRouter, the oracle router and the baselines."""

from __future__ import annotations

from fedrouter.config import Config
from fedrouter.methods.base import PARTS, SERVINGS, ClientClusters, Job, Method, part_of
from fedrouter.methods.feddpa import FedDPA
from fedrouter.methods.fedit import FedIT
from fedrouter.methods.fedrouter import FedRouter
from fedrouter.methods.fedsa import FedSA
from fedrouter.methods.local import Local
from fedrouter.methods.oracle import Oracle
from fedrouter.methods.zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {m.name: m for m in (FedRouter, Oracle, Local, FedIT, FedDPA, FedSA, ZeroShot)}


def make_method(cfg: Config) -> Method:
    return METHODS[cfg["run.method"]](cfg)


__all__ = ["METHODS", "PARTS", "SERVINGS", "ClientClusters", "Job", "Method", "make_method", "part_of"]
