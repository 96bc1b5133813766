"""IFCA: client-level clustered federated learning with k shared adapters.

Ghosh et al., "An Efficient Framework for Clustered Federated Learning" (NeurIPS 2020), Algorithm 2 (model
averaging) with LoRA adapters as the cluster models. Each round the server sends all k adapters to every
client; a client computes each one's loss on its own training samples, trains the one with the lowest loss (its
cluster identity) and uploads only that one; the server averages each adapter over the clients that picked it
(by sample count). A client answers every test sample with the adapter of lowest loss on its training samples.

It is the client-centric counterpart of FedRouter's task-centric clustering: a client holding several tasks
belongs to one cluster and gets one adapter for all of them.

Where ours differs from the paper, and why:

- All k adapters start from the common initial adapter: LoRA's B starts at zero, so they all answer like the
  base model and no loss tells them apart in the first round. Each client then picks one at random (a
  generator seeded by run seed, round and client id): IFCA's random initial partition, drawn by the clients
  instead of by random model initialisations, without computing the k equal losses. From the second round the
  lowest loss decides.
- Training is ``train.local_steps`` optimizer steps, like every other method here (the paper: local epochs).
- ``ifca.k`` is a setting (the paper tunes k; there is no search for it).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedrouter.arrays import Arrays
from fedrouter.config import Setting
from fedrouter.methods.base import ClientClusters, Job, Method, Serving
from fedrouter.methods.registry import register


def _positive(value: int) -> str | None:
    return None if value >= 1 else "at least 1"


@register
class IFCA(Method):
    name = "ifca"
    title = "IFCA"
    paper = "Ghosh et al. 2020"
    order = 5
    client_personalized = True
    settings: ClassVar[dict[str, Setting]] = {
        "ifca.k": Setting(int, 4, "IFCA: how many shared adapters (cluster models) clients choose among", _positive)
    }

    @classmethod
    def check(cls, cfg) -> str | None:
        if cfg["privacy.update_clip"] > 0:
            return (
                "setting 'privacy.update_clip' works on one adapter sent per round (Flower's LocalDpMod), and IFCA "
                "sends every client all 'ifca.k' adapters"
            )
        return None

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {str(j): dict(initial) for j in range(self.cfg["ifca.k"])}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        """Every adapter is offered; the client trains one (``select_jobs``)."""
        return [Job(name=str(j), shared=str(j)) for j in range(self.cfg["ifca.k"])]

    def accepts(self, offered: list[Job], trained: list[Job]) -> bool:
        return len(trained) == 1

    def select_jobs(self, base, jobs: list[Job], start: dict[str, Arrays], examples: list, seed: int) -> list[Job]:
        adapters = [start[job.name] for job in jobs]
        if all(identical(adapters[0], other) for other in adapters[1:]):
            # The first round: identical adapters give identical losses, so computing them is wasted work.
            # The draw is the one ``lowest`` makes among k tied losses.
            return [jobs[lowest(np.zeros(len(jobs)), seed)]]
        return [jobs[lowest(adapter_losses(base, adapters, examples, self.cfg), seed)]]

    def serve(self, serving: Serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        names = sorted(serving.shared, key=int)
        losses = adapter_losses(serving.base, [serving.shared[n] for n in names], serving.train_examples(), self.cfg)
        chosen = ("shared", names[lowest(losses, serving.client)])
        return {mode: [chosen] * len(samples) for mode in modes}


def adapter_losses(base, adapters: list[Arrays], examples: list, cfg) -> np.ndarray:
    """Each adapter's mean loss on ``examples`` (the client's training samples)."""
    from fedrouter.model import compute, lora

    losses = []
    for adapter in adapters:
        lora.set_adapter(base, adapter)
        losses.append(compute.mean_loss(base, examples, batch_size=cfg["eval.batch_size"]))
    return np.array(losses)


def identical(a: Arrays, b: Arrays) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[name], b[name]) for name in a)


def lowest(losses: np.ndarray, seed: int) -> int:
    """The index of the lowest loss; among losses equal to it (to 1e-6, as at the start), one drawn by ``seed``."""
    tied = np.flatnonzero(losses <= losses.min() + 1e-6)
    return int(tied[np.random.default_rng(seed).integers(len(tied))])
