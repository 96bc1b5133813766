"""Local: every client trains its own adapter on all its samples; nothing is shared (no communication)."""

from __future__ import annotations

from fedrouter.arrays import Arrays
from fedrouter.methods.base import ClientClusters, Job, Method
from fedrouter.methods.registry import register


@register
class Local(Method):
    name = "local"
    title = "Local"
    paper = "standard baseline"
    order = 1
    client_personalized = True
    personal_state = True

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [Job(name="local", personal="local", part="none")]

    def serve(self, serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        return {mode: [("personal",)] * len(samples) for mode in modes}
