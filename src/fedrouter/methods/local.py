"""Local: every client trains its own adapter on all its samples; nothing is shared (no communication)."""

from __future__ import annotations

from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class Local(Method):
    name = "local"
    serving = "personal"
    paper = "standard baseline"
    personal_state = True

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [Job(name="local", personal="local", part="none")]
