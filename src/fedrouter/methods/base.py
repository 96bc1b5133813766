"""The shape every method has: which adapters the server keeps, what each client trains, how it answers.

A method is server-side bookkeeping only. Clients run the same three handlers for every method; a round's
``Job`` list tells a client which adapter to start from, which samples to train on, what to keep and what to
send back, and the method's ``serving`` rule tells it which adapter answers each test sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from fedrouter.config import Config

Arrays = dict[str, np.ndarray]

PARTS = ("all", "lora_A", "none")
SERVINGS = ("route", "task", "shared", "personal", "overlay", "mix", "base")


@dataclass(frozen=True)
class Job:
    """One adapter a client trains in a round.

    ``shared``: the server adapter sent down and averaged afterwards (None: a personal adapter only).
    ``local_cluster``: train on this local cluster's samples (None: all of the client's samples).
    ``personal``: the client keeps the trained adapter under this name and starts from it next round.
    ``part``: which weights travel both ways: ``all``, ``lora_A`` (FedSA) or ``none``.
    ``partner``: another adapter mixed in, frozen, at half weight while this one trains (FedDPA): the one of
    that name trained earlier in the same round, else the client's personal one, else the one the server sent.
    """

    name: str
    shared: str | None = None
    local_cluster: int | None = None
    personal: str | None = None
    part: str = "all"
    partner: str | None = None


@dataclass
class ClientClusters:
    """What the server knows of one client after the clustering phase."""

    node_id: int
    client_id: int
    centroids: np.ndarray  # (num_local, hidden); empty (0, 0) for methods that do not cluster
    counts: np.ndarray  # samples per local cluster
    tasks: list[str]
    task_counts: np.ndarray  # (num_local, len(tasks)), evaluation-only labels
    silhouette: dict[int, float]
    assignment: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # global cluster per local
    # RMS radius of each local cluster, for the global clustering only (absent under privacy; not checkpointed)
    spreads: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())


def part_of(arrays: Arrays, part: str) -> Arrays:
    """The weights of an adapter that travel for ``part``."""
    if part == "all":
        return dict(arrays)
    if part == "lora_A":
        return {key: value for key, value in arrays.items() if "lora_A" in key}
    return {}


class Method:
    """Base class: subclasses set the class attributes and define ``shared_adapters`` and ``jobs``.

    ``clustering``: how clients form local clusters (``kmeans``, ``task`` labels, or ``none``).
    ``serving``: how a client picks the adapter for a test sample (see ``SERVINGS``; the client implements them).
    ``personal_state``: clients keep adapters of their own between rounds (never sent to the server).
    ``trains``: the method has training rounds (False: the run goes from clustering straight to evaluation).
    """

    name: ClassVar[str]
    clustering: ClassVar[str] = "none"
    serving: ClassVar[str]
    paper: ClassVar[str] = ""
    personal_state: ClassVar[bool] = False
    trains: ClassVar[bool] = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        """The adapters the server keeps and averages, keyed by name, at the start."""
        raise NotImplementedError

    def schedule(self, clients: list[ClientClusters]) -> None:
        """Called before each training round with every client the server knows, absent ones included (so a
        client dropping out does not reshuffle the others), ordered by client id. Nothing to plan by default."""

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        """What ``client`` trains in round ``round_index`` (0-based)."""
        raise NotImplementedError

    def add_global_cluster(self, shared: dict[str, Arrays], initial: Arrays, g: int) -> None:
        """A global cluster opened by a client that joined late starts from the common initial adapter."""
        shared[str(g)] = dict(initial)
