"""The shape every method has: one object whose hooks say everything that differs between methods.

The server and the clients run the same code for every method and call these hooks; they never compare a
method's name. A method says

- how a client groups its training samples (``group_samples``: embedding clusters, true tasks, one group) and
  how the server groups the clients' groups (``group_clusters``, ``join``: global clusters, one per task, one);
- which adapters the server keeps (``shared_adapters``) and what each client trains in a round (``jobs``, a list
  of ``Job``); how a client trains a job (``train_job``: the default loop, or an objective of its own) and which
  of the offered jobs it takes (``select_jobs``);
- how a client answers a test sample (``serve``: an adapter key per sample; ``adapter``: the weights a key
  names).

The defaults are those of the simplest method: one group, one shared adapter answering everything. A new
method is one file: a subclass that overrides what it changes, decorated with ``register``
(``fedrouter.methods.registry``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedrouter.algorithm.routing import cluster_radii
from fedrouter.arrays import Arrays
from fedrouter.config import Setting

if TYPE_CHECKING:
    from fedrouter.config import Config
    from fedrouter.data import ClientData, Sample
    from fedrouter.model.loading import BaseModel

PARTS = ("all", "lora_A", "none")


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
    centroids: np.ndarray  # (num_local, hidden); (1, 0) for methods that do not embed
    counts: np.ndarray  # samples per local cluster
    tasks: list[str]
    task_counts: np.ndarray  # (num_local, len(tasks)), evaluation-only labels
    silhouette: dict[int, float]
    assignment: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # global cluster per local
    # RMS radius of each local cluster: for the global clustering and the clusters' radii (absent under privacy)
    spreads: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())


@dataclass
class Grouping:
    """How a client grouped its training samples: a local cluster per sample and, for methods that embed, the
    samples' embeddings and each cluster's centroid (the client keeps both; it uploads the centroids)."""

    labels: np.ndarray
    embeddings: np.ndarray | None = None
    centroids: np.ndarray | None = None
    scores: dict[int, float] = field(default_factory=dict)  # silhouette score per k tried
    embed_s: float = 0.0
    cluster_s: float = 0.0


@dataclass
class Serving:
    """What a client has when it answers its test samples."""

    base: BaseModel
    cfg: Config
    client: int
    shared: dict[str, Arrays]  # the server's adapters, validated
    personal: Arrays | None  # the client's own adapter ("local"), or a fresh one where it trained none
    local: Arrays  # the client's local clustering state: labels, and embeddings and centroids for methods that embed
    train_inputs: list  # each training sample's prompt (an instruction, or a chat as a list of turns)
    extra: dict = field(default_factory=dict)  # what ``Method.read_serving`` took from the server's message
    # The client's tokenized training examples, made on first call (a method that scores adapters on them)
    train_examples: Callable[[], list] = list


def global_radii(clients: list[ClientClusters], centers: np.ndarray) -> np.ndarray | None:
    """Each global cluster's radius (``routing.cluster_radii``) from the clients' local clusters; None when a client
    sent no spreads (``privacy.centroid_clip``)."""
    members = [c for c in clients if len(c.assignment)]
    if not members or any(c.spreads is None for c in members):
        return None
    return cluster_radii(
        np.asarray(centers, np.float64),
        [c.centroids for c in members],
        [c.counts for c in members],
        [c.spreads for c in members],
        [c.assignment for c in members],
    ).astype(np.float32)


def derived_seed(*parts: int) -> int:
    """A seed made from several numbers (run seed, round, client, ...): the same on every machine."""
    return zlib.crc32(",".join(map(str, parts)).encode())


def part_of(arrays: Arrays, part: str) -> Arrays:
    """The weights of an adapter that travel for ``part``."""
    if part == "all":
        return dict(arrays)
    if part == "lora_A":
        return {key: value for key, value in arrays.items() if "lora_A" in key}
    return {}


class Method:
    """Base class of every method; the defaults are FedIT's (one shared adapter, trained by every client).

    ``title``: the method's row name in tables. ``kind``: ``reference`` (no fine-tuning), ``router`` (FedRouter),
    ``upper bound`` or ``baseline``; ``order``: its place among methods of its kind; ``client_personalized``: a client-personalized baseline (Local, FedDPA,
    FedSA), the comparison the paper's generalization claim is about.
    ``embeds``: clients embed their samples and upload the centroids of their groups.
    ``routes``: the server's adapters are numbered global clusters that a router picks per sample; the server
    sends the global centroids for evaluation and saves a router artifact.
    ``personal_state``: clients keep adapters of their own between rounds (never sent to the server).
    ``trains``: the method has training rounds (False: the run goes from clustering straight to evaluation).
    ``shared_part``: what the server's adapters hold (``all``, or ``lora_A`` where B stays on the clients).
    ``settings``: settings of the method's own, named ``<name>.<setting>`` (``fedrouter config`` lists them).
    """

    name: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    kind: ClassVar[str] = "baseline"
    order: ClassVar[int] = 100
    client_personalized: ClassVar[bool] = False
    embeds: ClassVar[bool] = False
    routes: ClassVar[bool] = False
    personal_state: ClassVar[bool] = False
    trains: ClassVar[bool] = True
    shared_part: ClassVar[str] = "all"
    settings: ClassVar[dict[str, Setting]] = {}

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: Config) -> str | None:
        """Why ``cfg`` cannot run this method, or None."""
        return None

    @classmethod
    def modes(cls, cfg: Config) -> list[str]:
        """The evaluation modes a run reports (``<set>/<mode>``): the method's own name unless it routes."""
        return [cls.name]

    @classmethod
    def routing_label(cls, mode: str) -> str | None:
        """How a benchmark record names the routing of ``mode`` (None: the method does not route)."""
        return None

    @classmethod
    def table_rows(cls) -> list[tuple[str | None, str]]:
        """The method's rows in benchmark tables: (the records' routing, the row's label)."""
        return [(None, cls.title)]

    # --- a client groups its samples ---

    def group_samples(self, base: BaseModel, data: ClientData) -> Grouping:
        """Local clusters of the client's training samples. Default: one group holding every sample."""
        return Grouping(labels=np.zeros(len(data.train), dtype=np.int64))

    def refine_rounds(self) -> int:
        """How many times the server sends global centroids back for clients to split their groups."""
        return 0

    def refine_samples(self, local: Arrays, centers: np.ndarray, what: str) -> np.ndarray:
        """New local labels once the server's global ``centers`` are known (only where ``refine_rounds``)."""
        raise NotImplementedError(f"method {self.name!r} does not refine its clusters")

    def local_k_limit(self, num_tasks: int) -> int:
        """The most local groups a client may report."""
        return 1

    # --- the server groups the clients' groups ---

    def group_clusters(self, clients: list[ClientClusters]) -> tuple[np.ndarray, dict]:
        """Set every client's ``assignment`` (global cluster of each local one); the global centroids and the
        scores of the search. Default: one global cluster."""
        for client in clients:
            client.assignment = np.zeros(1, dtype=np.int64)
        return np.zeros((1, 0), dtype=np.float32), {}

    def join(self, clients: list[ClientClusters], centers: np.ndarray, client: ClientClusters) -> np.ndarray:
        """Place a client that arrived after the global clustering (sets its ``assignment``); the global
        centroids afterwards (new rows: global clusters it opened)."""
        client.assignment = np.zeros(1, dtype=np.int64)
        return centers

    # --- rounds: the server's adapters and the clients' jobs ---

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        """The adapters the server keeps and averages, keyed by name, at the start."""
        return {"global": part_of(initial, self.shared_part)}

    def schedule(self, clients: list[ClientClusters]) -> None:
        """Called before each training round with every client the server knows, absent ones included (so a
        client dropping out does not reshuffle the others), ordered by client id. Nothing to plan by default."""

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        """What ``client`` may train in round ``round_index`` (0-based)."""
        return [Job(name="global", shared="global")]

    def add_global_cluster(self, shared: dict[str, Arrays], initial: Arrays, g: int) -> None:
        """A global cluster opened by a client that joined late starts from the common initial adapter."""
        shared[str(g)] = dict(initial)

    def accepts(self, offered: list[Job], trained: list[Job]) -> bool:
        """Whether a client's reply trained the right jobs of those offered. Default: all of them."""
        return trained == offered

    # --- a client trains ---

    def select_jobs(
        self, base: BaseModel, jobs: list[Job], start: dict[str, Arrays], examples: list, seed: int
    ) -> list[Job]:
        """Which of the offered ``jobs`` the client trains (``start``: each job's starting adapter; ``seed``: the
        client's for this round, for a method that draws). Default: all of them."""
        return jobs

    def train_job(self, base: BaseModel, job: Job, examples: list, partner: Arrays | None, **args) -> list[float]:
        """Train the adapter in the model's slot on ``examples``; the losses. ``partner``: mixed in, frozen, at
        half weight. ``args``: steps, batch_size, lr, seed."""
        from fedrouter.model import compute, lora

        if partner is None:
            return compute.train_adapter(base, examples, **args)
        lora.set_adapter(base, partner, slot=lora.PARTNER)
        with lora.mixed(base, 0.5, 0.5):
            return compute.train_adapter(base, examples, **args)

    # --- a client answers ---

    def serving_records(self, clients: list[ClientClusters], centers: np.ndarray, table: np.ndarray, tasks) -> dict:
        """What the server sends every client for evaluation besides its adapters: client id -> records.
        ``table``: training samples per (global cluster, task), from the clients' label counts; ``tasks``: its
        columns."""
        return {}

    def read_serving(self, content, keys: list[str], local: Arrays, who: str) -> dict:
        """Check and take what ``serving_records`` sent (``content``: the message's records)."""
        return {}

    def serve(self, serving: Serving, samples: list[Sample], modes: list[str]) -> dict[str, list[tuple]]:
        """An adapter key per sample for each mode, from the samples' inputs (never their tasks).

        Keys: ``("shared", name)``, ``("personal",)``, ``("overlay",)``, ``("mix", weight)``, ``("base",)``.
        Default: the shared adapter.
        """
        return {mode: [("shared", "global")] * len(samples) for mode in modes}

    def adapter(self, serving: Serving, key: tuple) -> Arrays | None:
        """The adapter that answers for ``key`` (None: the base model, no adapter). Evaluation loads each key's
        adapter into a slot of its own and decodes every test sample in one loop, as ``Router`` and
        ``fedrouter serve`` do (``fedrouter.model.decoding``)."""
        if key[0] == "base":
            return None
        if key[0] == "shared":
            return serving.shared[key[1]]
        if key[0] == "overlay":
            return serving.personal | serving.shared["global"]
        return serving.personal
