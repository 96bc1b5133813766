"""The router artifact: everything needed to route and serve after training, in open formats.

Layout of ``RUN_DIR/router/``::

    router.json                  base model, LoRA settings, embedding space, cluster counts, format version
    global_centroids.npy         (num_global, hidden) float32
    local_centroids.safetensors  one (num_local, hidden) tensor per client, key "client_<id>"
    cluster_map.json             {"<client>": [global cluster of each local cluster, ...]}
    adapters/cluster_<g>/        a PEFT adapter (adapter_config.json + adapter_model.safetensors),
                                 loadable with ``PeftModel.from_pretrained(base, path)``

No pickle anywhere. The folder is written beside and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from fedrouter.discovery import KINDS, EmbeddingSettings
from fedrouter.errors import ArtifactError
from fedrouter.model import LoraSettings

FORMAT_VERSION = 1
ROUTER_DIR = "router"
# How an artifact written before the embedding settings existed embedded prompts: the raw text, last layer, unscaled.
LEGACY_EMBEDDING = EmbeddingSettings("text", 1.0, "none")


@dataclass
class RouterArtifact:
    base_model: str
    model_name: str  # the FedRouter model setting ('smollm2', a path, a hub id)
    lora: LoraSettings
    global_centroids: np.ndarray
    local_centroids: dict[int, np.ndarray]
    cluster_map: dict[int, list[int]]
    adapters: dict[int, dict[str, np.ndarray]]
    precision: str = "auto"
    max_seq_len: int = 256
    # How prompts are embedded (the run's cluster.embedding / embed_* / edge_* settings).
    embedding: EmbeddingSettings = LEGACY_EMBEDDING

    @property
    def num_global(self) -> int:
        return len(self.global_centroids)

    def save(self, run_dir: Path) -> Path:
        target = Path(run_dir) / ROUTER_DIR
        tmp = Path(tempfile.mkdtemp(prefix=".router-", dir=run_dir))
        try:
            lora = self.lora.peft_config(self.base_model)
            for g, arrays in self.adapters.items():
                folder = tmp / "adapters" / f"cluster_{g}"
                lora.save_pretrained(folder)
                save_file(
                    {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
                    folder / "adapter_model.safetensors",
                )
            np.save(tmp / "global_centroids.npy", self.global_centroids.astype(np.float32), allow_pickle=False)
            save_file(
                {f"client_{c}": np.ascontiguousarray(v, dtype=np.float32) for c, v in self.local_centroids.items()},
                tmp / "local_centroids.safetensors",
            )
            (tmp / "cluster_map.json").write_text(
                json.dumps({str(c): m for c, m in self.cluster_map.items()}, indent=2)
            )
            meta = {
                "format_version": FORMAT_VERSION,
                "base_model": self.base_model,
                "model_name": self.model_name,
                "precision": self.precision,
                "max_seq_len": self.max_seq_len,
                "embedding": {
                    "kind": self.embedding.kind,
                    "depth": self.embedding.depth,
                    "scale": self.embedding.scale,
                    "edge_depth": self.embedding.edge_depth,
                    "edge_tokens": self.embedding.edge_tokens,
                },
                "num_global_clusters": self.num_global,
                "hidden_size": int(self.global_centroids.shape[1]),
                "lora": self.lora.peft_fields(),
            }
            (tmp / "router.json").write_text(json.dumps(meta, indent=2))
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=".router-old-", dir=run_dir))
                target.rename(old / "router")
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @classmethod
    def load(cls, run_dir: str | Path) -> RouterArtifact:
        run_dir = Path(run_dir)
        folder = run_dir / ROUTER_DIR if (run_dir / ROUTER_DIR).is_dir() else run_dir
        meta_path = folder / "router.json"
        if not meta_path.is_file():
            raise ArtifactError(f"{run_dir}: no router artifact (expected {meta_path})")
        try:
            meta = json.loads(meta_path.read_text())
            centroids = np.load(folder / "global_centroids.npy", allow_pickle=False)
            local = {int(k.split("_", 1)[1]): v for k, v in load_file(folder / "local_centroids.safetensors").items()}
            cluster_map = {
                int(c): [int(g) for g in m] for c, m in json.loads((folder / "cluster_map.json").read_text()).items()
            }
            adapters = {
                g: load_file(folder / "adapters" / f"cluster_{g}" / "adapter_model.safetensors")
                for g in range(int(meta["num_global_clusters"]))
            }
            lora = LoraSettings.from_peft_fields(meta["lora"])
        except (OSError, KeyError, ValueError) as err:
            raise ArtifactError(f"{folder}: incomplete or unreadable router artifact: {err}") from err
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{meta_path}: format_version {meta.get('format_version')} (expected {FORMAT_VERSION})")
        if centroids.ndim != 2 or len(centroids) != meta["num_global_clusters"]:
            raise ArtifactError(f"{folder}: global_centroids.npy has shape {centroids.shape}")
        embedding = _embedding(meta.get("embedding", {"depth": 1.0, "scale": "none"}), meta_path)
        for client, mapping in cluster_map.items():
            if (
                client not in local
                or len(mapping) != len(local[client])
                or not all(0 <= g < len(centroids) for g in mapping)
            ):
                raise ArtifactError(f"{folder}: cluster_map.json entry for client {client} is inconsistent")
        return cls(
            base_model=meta["base_model"],
            model_name=meta["model_name"],
            lora=lora,
            global_centroids=centroids,
            local_centroids=local,
            cluster_map=cluster_map,
            adapters=adapters,
            precision=meta.get("precision", "auto"),
            max_seq_len=int(meta.get("max_seq_len", 256)),
            embedding=embedding,
        )

    def adapter_path(self, run_dir: str | Path, g: int) -> Path:
        return Path(run_dir) / ROUTER_DIR / "adapters" / f"cluster_{g}"


def _embedding(entry: object, meta_path: Path) -> EmbeddingSettings:
    """The artifact's embedding settings; an entry without a kind (written before prompt embeddings) is 'text'."""
    expected = (
        f"{meta_path}: 'embedding' must be {{kind {'|'.join(KINDS)}, depth and edge_depth in [0, 1], "
        "scale 'reference'|'none', edge_tokens >= 1}"
    )
    if not isinstance(entry, dict):
        raise ArtifactError(expected)
    defaults = EmbeddingSettings()
    settings = EmbeddingSettings(
        kind=entry.get("kind", "text"),
        depth=entry.get("depth"),
        scale=entry.get("scale"),
        edge_depth=entry.get("edge_depth", defaults.edge_depth),
        edge_tokens=entry.get("edge_tokens", defaults.edge_tokens),
    )
    fraction = (int, float)
    if not (
        settings.kind in KINDS
        and isinstance(settings.depth, fraction)
        and 0 <= settings.depth <= 1
        and isinstance(settings.edge_depth, fraction)
        and 0 <= settings.edge_depth <= 1
        and settings.scale in ("reference", "none")
        and isinstance(settings.edge_tokens, int)
        and not isinstance(settings.edge_tokens, bool)
        and settings.edge_tokens >= 1
    ):
        raise ArtifactError(expected)
    return settings
