"""The server's state after every round, in one file replaced atomically: what ``fedrouter run --resume`` reads.

``RUN_DIR/checkpoint.safetensors`` holds the arrays (every shared adapter, the initial adapter, the global
centroids and those each refinement round sent, each client's local centroids, counts, task histogram and
cluster map) and, as safetensors
metadata, a JSON document with the completed round number, the seed, the metrics so far and each adapter's array
names in order. No pickle.

There is no other random state to keep: the server draws nothing at random, and every client derives each
round's training seed from ``run.seed``, the round, its id and the local cluster, so a resumed run repeats
exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedrouter.arrays import Arrays
from fedrouter.errors import ArtifactError
from fedrouter.methods import ClientClusters
from fedrouter.runlog import atomic_write

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1
_CLIENT_ARRAYS = ("centroids", "counts", "task_counts", "assignment")


@dataclass
class ServerState:
    """Everything the server needs to go on with the next round."""

    clients: list[ClientClusters]
    centers: np.ndarray  # global centroids
    shared: dict[str, Arrays]  # the method's shared adapters
    initial: Arrays  # the common starting adapter (new global clusters start from it)
    metrics: dict
    rounds_done: int = 0
    refused: set[int] = field(default_factory=set)  # nodes whose clustering reply was rejected (not saved)
    # The global centroids each refinement round sent (clients that cluster later replay them)
    refinements: list[np.ndarray] = field(default_factory=list)


def save_checkpoint(run_dir: Path, state: ServerState, seed: int) -> Path:
    tensors: Arrays = {"centers": state.centers}
    for key, arrays in state.shared.items():
        tensors |= {f"shared/{key}/{name}": value for name, value in arrays.items()}
    tensors |= {f"initial/{name}": value for name, value in state.initial.items()}
    tensors |= {f"refinement/{i}": centers for i, centers in enumerate(state.refinements)}
    for client in state.clients:
        tensors |= {f"client/{client.client_id}/{name}": getattr(client, name) for name in _CLIENT_ARRAYS}
        if client.spreads is not None:  # the clusters' radii (routing.fallback) need them after a resume
            tensors[f"client/{client.client_id}/spreads"] = client.spreads
    document = {
        "format": FORMAT,
        "rounds_done": state.rounds_done,
        "seed": seed,
        "shared_keys": list(state.shared),
        # Each adapter's array names in their order in memory: a file lists them in its own order, and sums
        # over an adapter (its norm in the metrics) must add in the same order after a resume.
        "array_names": {"initial": list(state.initial)} | {f"shared/{k}": list(v) for k, v in state.shared.items()},
        "clients": [
            {
                "client_id": c.client_id,
                "tasks": c.tasks,
                "silhouette": {str(k): v for k, v in c.silhouette.items()},
            }
            for c in state.clients
        ],
        "metrics": state.metrics,
    }
    data = save(
        {key: np.ascontiguousarray(value) for key, value in tensors.items()},
        metadata={"fedrouter": json.dumps(document, allow_nan=False, default=_plain)},
    )
    path = Path(run_dir) / CHECKPOINT
    atomic_write(path, data)
    return path


def load_checkpoint(run_dir: Path) -> tuple[ServerState, int]:
    """The saved state and its seed; a clear error when the file is missing or not a FedRouter checkpoint."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ArtifactError(f"{path}: no checkpoint (the run stopped before its clustering finished)")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        document = json.loads(header["__metadata__"]["fedrouter"])
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{path}: not a readable FedRouter checkpoint ({err})") from None
    if document.get("format") != FORMAT:
        raise ArtifactError(f"{path}: checkpoint format {document.get('format')!r}, expected {FORMAT}")

    names = document.get("array_names", {})

    def group(prefix: str) -> Arrays:
        found = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        order = [name for name in names.get(prefix.rstrip("/"), []) if name in found]
        return {name: found[name] for name in order} | found

    clients = []
    for info in document["clients"]:
        arrays = group(f"client/{info['client_id']}/")
        missing = [name for name in _CLIENT_ARRAYS if name not in arrays]
        if missing:
            raise ArtifactError(f"{path}: client {info['client_id']} lacks {missing}")
        clients.append(
            ClientClusters(
                node_id=-1,  # node ids belong to one Flower run; clients are matched again by client id
                client_id=int(info["client_id"]),
                centroids=arrays["centroids"],
                counts=arrays["counts"],
                tasks=list(info["tasks"]),
                task_counts=arrays["task_counts"],
                silhouette={int(k): float(v) for k, v in info["silhouette"].items()},
                assignment=arrays["assignment"],
                spreads=arrays.get("spreads"),
            )
        )
    state = ServerState(
        clients=clients,
        centers=tensors["centers"],
        shared={key: group(f"shared/{key}/") for key in document["shared_keys"]},
        initial=group("initial/"),
        metrics=document["metrics"],
        rounds_done=int(document["rounds_done"]),
        refinements=[tensors[f"refinement/{i}"] for i in range(len(group("refinement/")))],
    )
    return state, int(document["seed"])


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
