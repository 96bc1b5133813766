"""Zero-shot: the base model answers every test sample with no adapter; nothing trains, nothing is sent.

The floor every fine-tuning method should clear, and the reference that shows whether a method's adapters help
or hurt on tasks its clients never trained on.
"""

from __future__ import annotations

from fedrouter.methods.base import Arrays, ClientClusters, Job, Method


class ZeroShot(Method):
    name = "zeroshot"
    serving = "base"
    paper = "reference (no fine-tuning)"
    trains = False

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return []
