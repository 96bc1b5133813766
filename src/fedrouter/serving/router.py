"""Serving a trained FedRouter: embed each prompt, route it to a cluster's adapter, generate.

from fedrouter import Router
router = Router.load("runs/my-run")
for answer in router.generate(["Sort these words: pear, fig"], mode="global"):
    print(answer.adapter, answer.name, answer.text)  # 1 'sorting (96%)' ...

A prompt is an instruction (one user turn) or a chat: a list of ``{"role": ..., "content": ...}`` messages
(system, user and assistant turns). What is embedded to route a chat is its last user turn (``routing_text``):
clients embedded their raw training inputs, one instruction each, and a system prompt or earlier turns move the
embedding away from the task of the question being asked (measured in ``benchmarks/serving_routing.py``).

All adapters are loaded once, each into its own slot, and one batch mixes them (``fedrouter.model.decoding``):
``fedrouter serve`` answers through these same methods, so the Python API and the server give the same answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import numpy as np

from fedrouter import discovery
from fedrouter.algorithm.clustering import squared_distances
from fedrouter.algorithm.routing import fall_back, route
from fedrouter.errors import ConfigError, ModelError
from fedrouter.model import decoding
from fedrouter.model.loading import BaseModel, load_base_model
from fedrouter.model.prompts import chat_head, chat_ids
from fedrouter.serving.artifact import PRECISIONS, ArtifactError, RouterArtifact, check_fallback

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message]]  # noqa: UP007 (a runtime alias: `|` on a string and a generic fails)

MODES = ("global", "local", "cluster", "base")


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, max_new_tokens: int, context: int) -> None:
        super().__init__(
            f"the prompt is {tokens} tokens and max_tokens is {max_new_tokens}: together {tokens + max_new_tokens}, "
            f"more than the model's context of {context} tokens"
        )
        self.tokens, self.context = tokens, context


@dataclass(frozen=True)
class Route:
    """How a prompt's adapter is chosen: ``global`` (nearest global centroid), ``local`` (nearest of one
    client's local centroids, then its global cluster), ``cluster`` (this adapter), ``base`` (no adapter)."""

    mode: str = "global"
    client: int | None = None
    cluster: int | None = None


@dataclass(frozen=True)
class Choice:
    adapter: int | None  # the global cluster whose adapter serves the prompt; None: the base model
    distance: float | None  # Euclidean distance to the centroid that chose it (None when nothing was embedded)
    distances: tuple[float, ...] = ()  # to every global centroid, in cluster order (empty when not embedded)
    fallback: bool = False  # the prompt lay too far from its cluster: the fallback (routing.fallback) serves it


@dataclass(frozen=True)
class Answer:
    prompt: Prompt
    text: str
    adapter: int | None  # the global cluster whose adapter served this prompt; None: the base model
    distance: float | None = None
    finish_reason: str = "stop"  # "stop" (end token or a stop string) or "length" (max_new_tokens reached)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    name: str = ""  # the adapter's readable name (``Router.name``): 'base' for the base model
    fallback: bool = False  # served by the fallback (``Choice.fallback``)
    # one per answer token when ``generate`` was asked for ``logprobs``: its log-probability and the alternatives
    logprobs: tuple[decoding.TokenLogprob, ...] = ()


def routing_text(prompt: Prompt) -> str:
    """The text embedded to route a prompt: the instruction itself, or a chat's last user turn."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    raise ValueError("a chat needs at least one user message to route")


def with_fallback(artifact: RouterArtifact, route: str | None = None, factor: float | None = None) -> RouterArtifact:
    """The artifact with another fallback than the run's (``routing.fallback``): ``route`` 'none', 'base' or a
    cluster's index or name, ``factor`` in units of a cluster's radius; None keeps the recorded one. A
    ``ConfigError`` when the router cannot (no radii recorded, an unknown cluster)."""
    if route is not None and route in artifact.names:
        route = str(artifact.names.index(route))
    try:
        route, factor = check_fallback(
            artifact.fallback if route is None else route,
            artifact.fallback_factor if factor is None else factor,
            artifact.num_global,
            artifact.radii is not None,
        )
    except ValueError as err:
        raise ConfigError(f"fallback: {err}") from None
    return replace(artifact, fallback=route, fallback_factor=factor)


class Router:
    """A loaded router artifact plus the base model it was trained on (loaded once)."""

    def __init__(self, artifact: RouterArtifact, base: BaseModel) -> None:
        artifact.check_model(base)  # the centroids' width and every adapter tensor fit this model, or ArtifactError
        self.artifact = artifact
        self.base = base
        self._slots: list[str] | None = None
        self._head = chat_head(base.tokenizer)  # the chat template's head: its keys and values are computed once
        self._heads: dict = {}  # per adapter slot, shared by every batch of this router (decoding.Batch)

    def set_fallback(self, route: str | None = None, factor: float | None = None) -> None:
        """Serve with another fallback than the run's: see ``with_fallback``."""
        self.artifact = with_fallback(self.artifact, route, factor)

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        *,
        model: str | None = None,
        precision: str | None = None,
        fallback: str | None = None,
        fallback_factor: float | None = None,
    ) -> Router:
        """Load ``RUN_DIR/router`` and its base model (``model`` overrides the recorded model name; ``fallback`` and
        ``fallback_factor`` the run's: ``with_fallback``); a damaged artifact, or one the model does not fit, is
        an ``ArtifactError`` naming the file."""
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        artifact = with_fallback(RouterArtifact.load(run_dir), fallback, fallback_factor)  # before the model loads
        name = model or artifact.model_name
        try:
            base = load_base_model(name, precision=precision or artifact.precision, lora=artifact.lora)
        except ModelError as err:
            if model:  # the caller's model, not the artifact's
                raise
            message = " ".join(str(err).split())
            raise ArtifactError(
                f"{artifact.folder / 'router.json'}: model_name {name!r:.100} cannot be loaded ({message[:300]})"
            ) from None
        return cls(artifact, base)

    @property
    def num_adapters(self) -> int:
        return self.artifact.num_global

    @property
    def names(self) -> list[str]:
        """Each global cluster's readable name, in cluster order (its adapter's id stays ``cluster_<g>``)."""
        return list(self.artifact.names)

    def name(self, adapter: int | None) -> str:
        """The readable name of an adapter (a global cluster), or 'base' for None (no adapter)."""
        return "base" if adapter is None else self.artifact.names[adapter]

    @property
    def clients(self) -> list[int]:
        return sorted(self.artifact.local_centroids)

    @property
    def context(self) -> int:
        """The most tokens (prompt and answer) the base model takes."""
        return int(self.base.model.get_base_model().config.max_position_embeddings)

    def embed(self, prompts: Sequence[Prompt]) -> np.ndarray:
        space = discovery.embedding_space(self.base, self.artifact.embedding)
        texts = [routing_text(p) for p in prompts]
        return space.embed(self.base, texts, max_len=self.artifact.max_seq_len)

    def check_route(self, route: Route) -> None:
        if route.mode not in MODES:
            raise ValueError(f"unknown routing mode {route.mode!r} (expected one of {MODES})")
        if route.mode == "local" and route.client not in self.artifact.local_centroids:
            raise ValueError(f"local routing needs client= one of {self.clients}, got {route.client!r}")
        if route.mode == "cluster" and route.cluster not in range(self.num_adapters):
            raise ValueError(f"cluster routing needs cluster= one of 0..{self.num_adapters - 1}, got {route.cluster!r}")

    def choose(self, prompts: Sequence[Prompt], routes: Sequence[Route]) -> list[Choice]:
        """The adapter of each prompt under its own route; the prompts that need it are embedded in one batch."""
        for r in routes:
            self.check_route(r)
        embedded = [i for i, r in enumerate(routes) if r.mode in ("global", "local")]
        choices: list[Choice] = [Choice(r.cluster if r.mode == "cluster" else None, None) for r in routes]
        if not embedded:
            return choices
        points = self.embed([prompts[i] for i in embedded])
        to_global = np.sqrt(squared_distances(points, self.artifact.global_centroids))
        for row, i in enumerate(embedded):
            r = routes[i]
            local = self.artifact.local_centroids.get(r.client) if r.mode == "local" else None
            g = int(
                route(
                    points[row : row + 1],
                    mode=r.mode,
                    global_centroids=self.artifact.global_centroids,
                    local_centroids=local,
                    local_to_global=self.artifact.cluster_map.get(r.client) if local is not None else None,
                )[0]
            )
            # The distance to the centroid that chose: the global one, or the client's nearest local one.
            chosen = (
                float(to_global[row, g])
                if local is None
                else float(np.sqrt(squared_distances(points[row : row + 1], local).min()))
            )
            choices[i] = self._fall_back(points[row], g, Choice(g, chosen, tuple(float(d) for d in to_global[row])))
        return choices

    def _fall_back(self, point: np.ndarray, g: int, choice: Choice) -> Choice:
        """``choice``, or the fallback's when ``point`` lies beyond the factor x cluster g's radius (the rule
        evaluation applies: ``routing.fall_back``)."""
        artifact = self.artifact
        if artifact.fallback == "none":
            return choice
        if not fall_back(
            point[None], np.array([g]), artifact.global_centroids, artifact.radii, artifact.fallback_factor
        )[0]:
            return choice
        target = None if artifact.fallback == "base" else int(artifact.fallback)
        return replace(choice, adapter=target, fallback=True)

    def route(self, prompts: Sequence[Prompt], *, mode: str = "global", client: int | None = None) -> np.ndarray:
        """Global cluster index for each prompt (-1: the fallback sends it to the base model). ``mode="local"``
        needs the ``client`` whose clusters to use."""
        if mode not in ("global", "local"):
            raise ValueError(f"route: mode {mode!r} embeds nothing (expected 'global' or 'local')")
        choices = self.choose(list(prompts), [Route(mode, client)] * len(prompts))
        return np.asarray([-1 if c.adapter is None else c.adapter for c in choices], dtype=np.int64)

    def encode(self, prompt: Prompt, max_new_tokens: int, tokenizer=None) -> list[int]:
        """The prompt's token ids under the model's chat template; too long for the context: ``PromptTooLong``.

        ``tokenizer``: a copy of the model's, for a thread other than the one generating (a Rust tokenizer is
        not safe to share between threads that tokenize at once).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = chat_ids(tokenizer or self.base.tokenizer, messages)
        if len(ids) + max_new_tokens > self.context:
            raise PromptTooLong(len(ids), max_new_tokens, self.context)
        return ids

    def decode(self, rows: Sequence[decoding.Row], *, max_rows: int = 16) -> list[decoding.Completion]:
        """Decode rows that may each use another adapter (slot names from ``slot``), at most ``max_rows`` at once:
        a finished row's place goes to the next one (``decoding.Batch``)."""
        self._load_slots()
        return decoding.decode(self.base, rows, max_rows=max_rows, prefix=self._head, prefixes=self._heads)

    def batch(self) -> decoding.Batch:
        """An empty ``decoding.Batch`` on this router's model, every adapter loaded (for a serving loop)."""
        self._load_slots()
        return decoding.Batch(self.base, self._head, self._heads)

    def _load_slots(self) -> None:
        if self._slots is None:
            self._slots = decoding.load_adapters(self.base, self.artifact.adapters)

    @staticmethod
    def slot(adapter: int | None) -> str:
        return decoding.BASE if adapter is None else decoding.adapter_slot(adapter)

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        mode: str = "global",
        client: int | None = None,
        cluster: int | None = None,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        batch_size: int = 16,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: int | None = None,
    ) -> list[Answer]:
        """Route every prompt, then generate up to ``batch_size`` at once, adapters mixed in one batch; answers keep
        the prompts' order.

        ``temperature`` 0 decodes greedily; above 0 it samples (with ``top_p``), reproducibly when ``seed`` is
        given. Each answer ends at the end token, at the first of the ``stop`` strings (not included) or after
        ``max_new_tokens`` tokens. ``presence_penalty`` and ``frequency_penalty`` (-2 to 2) lower the logits of
        tokens the answer already holds, as OpenAI's do; ``logprobs`` (0 to 20) gives each answer token's
        log-probability and that many most likely alternatives (``Answer.logprobs``), as ``fedrouter serve`` does.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        sampling = decoding.Sampling(
            max_new_tokens, temperature, top_p, tuple(stop), seed, presence_penalty, frequency_penalty, logprobs
        )
        choices = self.choose(prompts, [Route(mode, client, cluster)] * len(prompts))
        rows = [
            decoding.Row(self.encode(p, max_new_tokens), self.slot(c.adapter), sampling)
            for p, c in zip(prompts, choices, strict=True)
        ]
        completions = self.decode(rows, max_rows=batch_size)
        return [
            Answer(
                p,
                done.text,
                c.adapter,
                c.distance,
                done.finish_reason,
                done.prompt_tokens,
                done.completion_tokens,
                self.name(c.adapter),
                c.fallback,
                done.logprobs,
            )
            for p, c, done in zip(prompts, choices, completions, strict=True)
        ]
