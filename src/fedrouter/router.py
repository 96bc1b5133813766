"""Serving a trained FedRouter: embed each prompt, route it to a cluster's adapter, generate batched per adapter.

from fedrouter import Router
router = Router.load("runs/my-run")
for answer in router.generate(["Sort these words: pear, fig"], mode="global"):
    print(answer.adapter, answer.text)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrouter import discovery
from fedrouter.algorithm.routing import route
from fedrouter.artifact import ArtifactError, RouterArtifact
from fedrouter.model import compute, lora
from fedrouter.model.loading import BaseModel, load_base_model, lora_config


@dataclass(frozen=True)
class Answer:
    prompt: str
    text: str
    adapter: int  # the global cluster whose adapter served this prompt


class Router:
    """A loaded router artifact plus the base model it was trained on (loaded once)."""

    def __init__(self, artifact: RouterArtifact, base: BaseModel) -> None:
        if base.hidden_size != artifact.global_centroids.shape[1]:
            raise ArtifactError(
                f"model {base.name!r} embeds in {base.hidden_size} dimensions, the router's centroids have "
                f"{artifact.global_centroids.shape[1]}: load the router with the model it was trained on"
            )
        self.artifact = artifact
        self.base = base

    @classmethod
    def load(cls, run_dir: str | Path, *, model: str | None = None, precision: str | None = None) -> Router:
        """Load ``RUN_DIR/router`` and its base model (``model`` overrides the recorded model name)."""
        artifact = RouterArtifact.load(run_dir)
        config = artifact.lora
        base = load_base_model(
            model or artifact.model_name,
            precision=precision or artifact.precision,
            lora=lora_config(
                config["r"], config["lora_alpha"], config["lora_dropout"], config["target_modules"], artifact.base_model
            ),
        )
        return cls(artifact, base)

    @property
    def num_adapters(self) -> int:
        return self.artifact.num_global

    def embed(self, prompts: Sequence[str]) -> np.ndarray:
        space = discovery.embedding_space(self.base, self.artifact.embed_depth, self.artifact.embed_scale)
        return space.embed(self.base, list(prompts), max_len=self.artifact.max_seq_len)

    def route(self, prompts: Sequence[str], *, mode: str = "global", client: int | None = None) -> np.ndarray:
        """Global cluster index for each prompt. ``mode="local"`` needs the ``client`` whose clusters to use."""
        local_centroids = local_map = None
        if mode == "local":
            if client is None or client not in self.artifact.local_centroids:
                known = sorted(self.artifact.local_centroids)
                raise ValueError(f"local routing needs client= one of {known}, got {client!r}")
            local_centroids = self.artifact.local_centroids[client]
            local_map = self.artifact.cluster_map[client]
        return route(
            self.embed(prompts),
            mode=mode,
            global_centroids=self.artifact.global_centroids,
            local_centroids=local_centroids,
            local_to_global=local_map,
        )

    def generate(
        self,
        prompts: Sequence[str],
        *,
        mode: str = "global",
        client: int | None = None,
        max_new_tokens: int = 48,
        batch_size: int = 16,
    ) -> list[Answer]:
        """Route every prompt, then generate greedily, batched per adapter; answers keep the prompts' order."""
        prompts = list(prompts)
        if not prompts:
            return []
        clusters = self.route(prompts, mode=mode, client=client)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, g in enumerate(clusters):
            groups[int(g)].append(i)
        texts = [""] * len(prompts)
        for g, indices in sorted(groups.items()):
            lora.set_adapter(self.base, self.artifact.adapters[g])
            outputs = compute.generate(
                self.base,
                [prompts[i] for i in indices],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                max_len=self.artifact.max_seq_len + max_new_tokens,
            )
            for i, text in zip(indices, outputs, strict=True):
                texts[i] = text
        return [Answer(p, t, int(g)) for p, t, g in zip(prompts, texts, clusters, strict=True)]
