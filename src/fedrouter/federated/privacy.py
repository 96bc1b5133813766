"""Differentially private adapter updates: Flower's ``LocalDpMod`` around the train handler, configured by the
run's ``privacy.update_*`` settings (what it protects and what not: ``fedrouter.algorithm.privacy``)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import LocalDpMod
from flwr.clientapp.typing import ClientAppCallable

from fedrouter.federated.records import read_config


def update_privacy_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``LocalDpMod`` configured by the run's ``privacy.update_*`` settings (a pass-through when off).

    A train message that sends no adapter (the Local baseline) has nothing to protect and passes through.
    """
    cfg, _ = read_config(message.content["config"], ("round", "lr"))
    if cfg["privacy.update_clip"] <= 0 or not message.content.array_records:
        return call_next(message, context)
    mod = LocalDpMod(
        clipping_norm=cfg["privacy.update_clip"],
        sensitivity=cfg["privacy.update_clip"],
        epsilon=cfg["privacy.update_epsilon"],
        delta=cfg["privacy.update_delta"],
    )
    return mod(message, context, call_next)
