"""Values computed from a model alone (the embedding's reference scales), kept on disk once per model.

The reference scales take 256 random sequences through the model: seconds to minutes on a CPU, in every client
process of every run and in the server before its first answer. They depend only on the model's weights, the
compute dtype and device, and the settings that say what to compute, so they are stored under
``~/.cache/fedrouter/derived`` (``FEDROUTER_CACHE``), keyed by all of these, and read back by every later process.

A model is known by its files (a folder's ``config.json`` and the size and time stamp of each weight file; the
embedded model's folder is the dequantized one in the same cache) or by its hub revision. A model without either
(``tiny-random``, built in memory) is never cached. A stored file that does not read back as what was asked for
(another model's, truncated, not finite) is computed again and replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrouter.model.loading import BaseModel, cache_root

log = logging.getLogger("fedrouter")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def model_identity(base: BaseModel) -> str | None:
    """What names these exact weights, or None where nothing does (a model built in memory). Read from the
    files once per loaded model (its first call, right after loading)."""
    if "identity" not in base.derived:
        base.derived["identity"] = _identity(base)
    return base.derived["identity"]


def _identity(base: BaseModel) -> str | None:
    config = base.model.get_base_model().config
    folder = Path(str(getattr(config, "_name_or_path", "") or ""))
    if folder.is_dir() and (folder / "config.json").is_file():
        digest = hashlib.sha256((folder / "config.json").read_bytes())
        for path in sorted(folder.iterdir()):
            if path.suffix in WEIGHT_SUFFIXES:
                stat = path.stat()
                digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"folder:{folder.resolve()}:{digest.hexdigest()}"
    revision = getattr(config, "_commit_hash", None)
    return f"hub:{config._name_or_path}@{revision}" if revision else None


def stored_arrays(base: BaseModel, what: str, compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
    """``compute()``'s arrays for this model and ``what``, from the disk cache where they were computed before."""
    identity = model_identity(base)
    if identity is None:
        return compute()
    key = f"{identity}|{what}|{base.dtype}|{base.device.type}"
    path = cache_root() / "derived" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    arrays = _read(path, key, base.hidden_size)
    if arrays is None:
        arrays = compute()
        _write(path, key, arrays)
    return arrays


def _read(path: Path, key: str, width: int) -> list[np.ndarray] | None:
    """The arrays stored at ``path`` for ``key``, or None (absent, or not what was stored for it)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                raise ValueError("stored for another model or setting")
            arrays = [stored[f"part{i}"] for i in range(int(stored["parts"]))]
        for array in arrays:
            if array.shape != (width,) or array.dtype != np.float32 or not np.all(np.isfinite(array) & (array > 0)):
                raise ValueError(f"not {width} positive finite float32 values")
        return arrays
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("%s: %s; computing it again", path, err)
        return None


def _write(path: Path, key: str, arrays: list[np.ndarray]) -> None:
    """Store atomically (written beside, then renamed); a cache that cannot be written only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".npz", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            parts = {f"part{i}": np.asarray(a, dtype=np.float32) for i, a in enumerate(arrays)}
            np.savez(handle, key=np.array(key), parts=np.array(len(arrays)), **parts)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("cannot cache %s: %s", path, err)
