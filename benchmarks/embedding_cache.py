"""Every text of ../shared/data embedded once with SmolLM2-135M, at several layers and poolings.

The task-discovery benchmark (`benchmarks/task_discovery.py`) compares embeddings and clustering rules on many
task mixes; embedding is its only slow part, so it is done once here and cached (not committed):

    .venv/bin/python benchmarks/embedding_cache.py [--precision auto|fp32]

For every distinct input text of paper4, paper4-raw, extra and flan16 (train and test), two caches:

- ``text``: one forward pass over the raw text as `compute.embed` tokenizes it (`embedding_ids`: no template, cut
  to 256 tokens) gives, at each layer of ``LAYERS``, the mean over the input's tokens (``mean-<layer>``) and the
  hidden state at its last token (``last-<layer>``);
- ``prompt``: `compute.embed_prompts`, the product's own function for ``cluster.embedding = "prompt"``, for every
  (layer, edge) of ``PROMPT_PARTS`` in one pass (``prompt-<layer>-<edge>``), unscaled; the benchmark divides by
  the reference scales and concatenates as `discovery.EmbeddingSpace` does.

Written to ``$FEDROUTER_CACHE/task-discovery/embeddings-<precision>[-prompt].npz``, resumable in chunks, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedrouter.model import LoraSettings
from fedrouter.model.compute import embed_prompts, pad_rows
from fedrouter.model.loading import cache_root, shared_base_model
from fedrouter.model.prompts import embedding_ids

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SOURCES = ("flan16", "extra", "paper4", "paper4-raw")
# Hidden-state indices (0 = token embeddings, 30 = the last layer after the final norm, as `compute.embed` uses).
LAYERS = (6, 12, 16, 20, 24, 30)
# (hidden-state index, edge tokens) parts of prompt embeddings: the default's (6, 0) and (18, 32), and variations.
PROMPT_PARTS = ((6, 0), (12, 0), (12, 32), (15, 32), (18, 0), (18, 16), (18, 32), (21, 32))
MAX_LEN = 256
CHUNK = 512


def texts() -> list[str]:
    seen: dict[str, None] = {}
    for source in SOURCES:
        for split in ("train", "test"):
            for line in (DATA / source / f"{split}.jsonl").read_text().splitlines():
                seen.setdefault(json.loads(line)["instruction"], None)
    return list(seen)


def key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def base_model(precision: str):
    """The embedded SmolLM2-135M as `fedrouter run` loads it by default (its LoRA slot is never used here)."""
    return shared_base_model("smollm2", precision, LoraSettings())


def cache_path(precision: str, kind: str = "text") -> Path:
    suffix = "" if kind == "text" else f"-{kind}"
    return cache_root() / "task-discovery" / f"embeddings-{precision}{suffix}.npz"


def load(precision: str, kind: str = "text") -> dict[str, np.ndarray]:
    """A cache: ``keys`` (sha1 of each text) and one array per pooling, one row per key."""
    with np.load(cache_path(precision, kind)) as cached:
        return {name: cached[name] for name in cached.files}


def prompt_parts(base, batch: list[str]) -> dict[str, np.ndarray]:
    pooled = embed_prompts(base, batch, PROMPT_PARTS, max_len=MAX_LEN)
    return {f"prompt-{layer}-{edge}": points for (layer, edge), points in zip(PROMPT_PARTS, pooled, strict=True)}


@torch.inference_mode()
def embed_all(base, batch: list[str]) -> dict[str, np.ndarray]:
    tokenizer = base.tokenizer
    encoded = [embedding_ids(tokenizer, text, MAX_LEN) for text in batch]
    order = sorted(range(len(batch)), key=lambda i: len(encoded[i]))
    out = {
        f"{p}-{layer}": np.zeros((len(batch), base.hidden_size), np.float32)
        for p in ("mean", "last")
        for layer in LAYERS
    }
    backbone = base.model.get_base_model().base_model
    with base.model.disable_adapter(), base.autocast():
        for start in range(0, len(order), 32):
            index = order[start : start + 32]
            ids = pad_rows([encoded[i] for i in index], tokenizer.pad_token_id).to(base.device)
            mask = pad_rows([[1] * len(encoded[i]) for i in index], 0).to(base.device)
            hidden = backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            weights = mask.unsqueeze(-1).float()
            last = mask.sum(1) - 1
            for layer in LAYERS:
                h = hidden[layer].float()
                out[f"mean-{layer}"][index] = ((h * weights).sum(1) / weights.sum(1)).cpu().numpy()
                out[f"last-{layer}"][index] = h[torch.arange(len(index)), last].cpu().numpy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32"))
    args = parser.parse_args()
    wanted = texts()
    base = base_model(args.precision)
    for kind, compute in (("text", embed_all), ("prompt", prompt_parts)):
        fill(cache_path(args.precision, kind), wanted, lambda batch, compute=compute: compute(base, batch), kind)


def fill(path: Path, wanted: list[str], compute, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    done = dict(np.load(path)) if path.is_file() else {"keys": np.array([], dtype="<U40")}
    have = set(done["keys"].tolist())
    todo = [t for t in wanted if key(t) not in have]
    print(f"{kind}: {len(wanted)} texts, {len(todo)} to embed", flush=True)
    started = time.time()
    for start in range(0, len(todo), CHUNK):
        batch = todo[start : start + CHUNK]
        fresh = compute(batch)
        keys = np.concatenate([done["keys"], np.array([key(t) for t in batch])])
        done = {"keys": keys} | {
            name: np.concatenate([done[name], fresh[name]]) if name in done else fresh[name] for name in fresh
        }
        partial = path.with_suffix(".tmp.npz")
        np.savez(partial, **done)
        partial.replace(path)  # atomic: an interrupted run keeps the last complete chunk
        rate = (start + len(batch)) / (time.time() - started)
        print(f"{kind}: {start + len(batch)}/{len(todo)} ({rate:.1f} texts/s)", flush=True)


if __name__ == "__main__":
    main()
