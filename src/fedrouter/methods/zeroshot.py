"""Zero-shot: the base model answers every test sample with no adapter; nothing trains, nothing is sent.

The floor every fine-tuning method should clear, and the reference that shows whether a method's adapters help
or hurt on tasks its clients never trained on.
"""

from __future__ import annotations

from fedrouter.arrays import Arrays
from fedrouter.methods.base import ClientClusters, Job, Method
from fedrouter.methods.registry import register


@register
class ZeroShot(Method):
    name = "zeroshot"
    title = "Zero-shot (base model, no adapter)"
    paper = "reference (no fine-tuning)"
    kind = "reference"
    trains = False

    def shared_adapters(self, initial: Arrays, num_global: int) -> dict[str, Arrays]:
        return {}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return []

    def serve(self, serving, samples, modes: list[str]) -> dict[str, list[tuple]]:
        return {mode: [("base",)] * len(samples) for mode in modes}
