"""A client's round: the jobs the server offered, trained on the client's samples (``train_jobs``)."""

from __future__ import annotations

import zlib

import numpy as np

from fedrouter.arrays import Arrays
from fedrouter.config import Config
from fedrouter.methods import Job, Method, derived_seed, part_of
from fedrouter.model import lora
from fedrouter.model.loading import BaseModel


def train_jobs(
    method: Method,
    base: BaseModel,
    cfg: Config,
    client: int,
    examples: list,
    labels: np.ndarray,
    jobs: list[Job],
    received: dict[str, Arrays],
    personal: dict[str, Arrays],
    round_index: int,
    lr: float,
) -> tuple[dict[str, Arrays], dict[str, float]]:
    """Run a round's jobs on one client: returns what to upload (job name -> arrays) and metrics.

    A job starts from its personal adapter (or the common fresh start), overlaid with the weights the server
    sent (``received``, already validated); the method picks which jobs to train (``Method.select_jobs``) and
    trains each (``Method.train_job``); personal adapters are updated in ``personal``.
    """
    start = {}
    for job in jobs:
        weights = personal.get(job.personal) if job.personal else None
        if weights is None:
            weights = lora.fresh_adapter(base, cfg["run.seed"])  # the same start the server's adapters have
        start[job.name] = weights | received.get(job.name, {})
    uploads: dict[str, Arrays] = {}
    metrics: dict[str, float] = {}
    trained: dict[str, Arrays] = {}
    for job in method.select_jobs(base, jobs, start, examples, derived_seed(cfg["run.seed"], round_index, client)):
        partner = None
        if job.partner:  # trained earlier this round, else personal, else as the server sent it
            partner = trained.get(job.partner) or personal.get(job.partner)
            if partner is None and job.partner in received:
                partner = lora.fresh_adapter(base, cfg["run.seed"]) | received[job.partner]
        chosen = np.arange(len(examples)) if job.local_cluster is None else np.flatnonzero(labels == job.local_cluster)
        seed = derived_seed(
            cfg["run.seed"], round_index, client, -1 if job.local_cluster is None else job.local_cluster
        )
        seed = derived_seed(seed, zlib.crc32(job.name.encode()))
        lora.set_adapter(base, start[job.name])
        losses = method.train_job(
            base,
            job,
            [examples[i] for i in chosen],
            partner,
            steps=cfg["train.local_steps"],
            batch_size=cfg["train.batch_size"],
            lr=lr,
            seed=seed,
        )
        trained[job.name] = lora.get_adapter(base)
        if job.personal:
            personal[job.personal] = trained[job.name]
        if job.shared is not None and job.part != "none":
            uploads[job.name] = part_of(trained[job.name], job.part)
        metrics[f"loss.{job.name}"] = float(np.mean(losses))
        metrics[f"num_samples.{job.name}"] = len(chosen)
    return uploads, metrics
