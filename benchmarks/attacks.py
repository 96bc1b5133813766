"""Misbehaving clients for poisoning experiments and tests: FedRouter's real ClientApp handlers, whose replies an
``Attack`` rewrites for chosen clients (the server is the real one, with its ``aggregate.*`` guards).

    sys.path.insert(0, "benchmarks")  # from the project root
    from attacks import Attack, attack_app
    run_experiment(cfg, client_app=attack_app({1: Attack(scale=100.0)}))  # client 1 uploads 100x its update

An attack combines:
- ``scale``: the uploaded update (trained adapter minus the adapter the server sent) times a factor; -1 flips its
  sign (``SIGN_FLIP``);
- ``constant``: every uploaded weight set to this value (e.g. 1000.0);
- ``count_factor``: every sample count the client reports (clustering, refinement, training) times a factor:
  consistent, so it passes the server's count checks and weighs that much more in a weighted mean;
- ``drop_loss``: the training reply leaves out its ``loss.*`` metrics (a malformed reply);
- ``rounds``: the training rounds (1-based) with the adapter and loss attacks; empty: every round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from fedrouter.federated import client
from fedrouter.federated.privacy import update_privacy_mod
from fedrouter.federated.records import from_record, to_record


@dataclass(frozen=True)
class Attack:
    scale: float = 1.0
    constant: float | None = None
    count_factor: int = 1
    drop_loss: bool = False
    rounds: tuple[int, ...] = ()


SIGN_FLIP = Attack(scale=-1.0)
INFLATED_CONSTANT = Attack(constant=1000.0, count_factor=1_000_000)  # the probe of issue 44


def _inflate_counts(reply: Message, factor: int) -> Message:
    """Clusters, task counts and the reported sample count, all times ``factor``."""
    content = reply.content
    for name, key in (("clusters", "counts"), ("labels", "task_counts")):
        arrays = from_record(content.array_records[name])
        content.array_records[name] = to_record(arrays | {key: arrays[key] * factor})
    metrics = dict(content.metric_records["metrics"])
    content.metric_records["metrics"] = MetricRecord(metrics | {"num_samples": int(metrics["num_samples"]) * factor})
    return reply


def _poison_training(message: Message, reply: Message, attack: Attack, attacking: bool) -> Message:
    content = reply.content
    metrics = {}
    for key, value in content.metric_records["metrics"].items():
        if key.startswith("num_samples."):
            value = int(value) * attack.count_factor
        if not (attacking and attack.drop_loss and key.startswith("loss.")):
            metrics[key] = value
    content.metric_records["metrics"] = MetricRecord(metrics)
    if not attacking:
        return reply
    for name in list(content.array_records):
        trained = from_record(content.array_records[name])
        sent = from_record(message.content.array_records[name]) if name in message.content.array_records else {}
        poisoned = {}
        for key, value in trained.items():
            if attack.constant is not None:
                poisoned[key] = np.full_like(value, attack.constant)
            else:
                start = sent.get(key, np.zeros_like(value)).astype(np.float64)
                poisoned[key] = (start + attack.scale * (value.astype(np.float64) - start)).astype(value.dtype)
        content.array_records[name] = to_record(poisoned)
    return reply


def attack_app(attacks: dict[int, Attack]) -> ClientApp:
    """A ClientApp whose clients (partition / client ids) in ``attacks`` misbehave; the others are honest."""
    app = ClientApp()

    def attack_of(context: Context) -> Attack | None:
        node = context.node_config
        return attacks.get(int(node.get("client-id", node.get("partition-id", -1))))

    def clusters(handler):
        def handle(message: Message, context: Context) -> Message:
            reply = handler(message, context)
            attack = attack_of(context)
            return _inflate_counts(reply, attack.count_factor) if attack and attack.count_factor != 1 else reply

        return handle

    app.query("cluster")(clusters(client.cluster))
    app.query("refine")(clusters(client.refine))
    app.query("initial")(client.initial)
    app.evaluate()(client.evaluate)

    @app.train(mods=[update_privacy_mod])
    def train(message: Message, context: Context) -> Message:
        reply = client.train(message, context)
        attack = attack_of(context)
        if attack is None:
            return reply
        round_ = int(message.content["config"]["round"]) + 1
        return _poison_training(message, reply, attack, not attack.rounds or round_ in attack.rounds)

    return app
