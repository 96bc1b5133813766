"""What names a base model's exact weights: a record kept in the router artifact (router.json's ``base``).

A run's adapters fit the weights they were trained on, and nothing else. ``model.name`` alone does not say which
those were: ``smollm2`` is SmolLM2-135M-Instruct *dequantized from a Q4_1 GGUF file*, not the hub's full-precision
weights of the same name. The record, by the kind of model name:

- ``gguf`` (``smollm2``, a ``.gguf`` path): the file's name, sha256 and quantization type (the GGUF header's
  ``general.file_type``), the folder of its dequantized weights and their ``weights_sha256``; for ``smollm2`` also
  the package it comes from and the model it was quantized from;
- ``hub`` (a Hugging Face id): the id and its revision (the commit in the local hub cache; null where the model
  is not cached there);
- ``folder`` (a local model folder): its absolute path and ``weights_sha256``;
- ``builtin`` (``tiny-random``, built in memory from a seeded config): its name.

``weights_sha256`` is the sha256 of the lines ``NAME SHA256\\n`` of the folder's ``config.json`` and weight files
(``*.safetensors``, ``*.bin``), in name order: it depends on the files' contents only, so a copy of the folder
(``fedrouter export``'s ``base/``) has the digest of the original. (``derived.model_identity`` keys a cache by file
sizes and time stamps instead, which is cheap but differs for a copy.) Each file is hashed once per process and
size and time stamp.

``same_base`` says whether two records name the same weights: the same GGUF file, the same weights digest (a GGUF's
dequantized folder and a copy of it match), the same hub id and revision (an unknown revision matches any), or the
same built-in model.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO

from fedrouter.errors import ConfigError, ModelError

KINDS = ("gguf", "hub", "folder", "builtin")
BUILTIN = ("tiny-random",)
# What each kind of record holds: field -> "text", "sha256", "optional text" or "optional sha256".
FIELDS = {
    "gguf": {
        "file": "text",
        "sha256": "sha256",
        "quantization": "text",
        "dequantized": "text",
        "weights_sha256": "optional sha256",
        "package": "optional text",
        "quantized_from": "optional text",
    },
    "hub": {"id": "text", "revision": "optional text"},
    "folder": {"path": "text", "weights_sha256": "sha256"},
    "builtin": {"name": "text"},
}
# The field naming what from_pretrained loads, per kind (a built-in model has none).
LOADABLE = {"gguf": "dequantized", "hub": "id", "folder": "path"}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SHA256 = re.compile(r"[0-9a-f]{64}")

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256 of the file


def base_identity(model_name: str) -> dict:
    """The record of the weights ``model_name`` loads (see the module's docstring). For a GGUF file this makes
    its dequantized folder if it is not there yet (as loading the model would)."""
    if model_name in BUILTIN:
        return {"kind": "builtin", "name": model_name}
    from fedrouter.model import EMBEDDED_NAME

    if model_name == "smollm2":
        from fedrouter.model.loading import EMBEDDED_PACKAGE, embedded_gguf

        record = _gguf(embedded_gguf())
        package = EMBEDDED_PACKAGE.replace("_", "-")
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            package += " " + importlib.metadata.version(package)
        return record | {"package": package, "quantized_from": EMBEDDED_NAME}
    path = Path(model_name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"setting 'model.name': GGUF file {path} does not exist")
        return _gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"setting 'model.name': folder {path} has no config.json (expected a transformers model)")
        return {"kind": "folder", "path": str(path.resolve()), "weights_sha256": weights_digest(path)}
    return {"kind": "hub", "id": model_name, "revision": _cached_revision(model_name)}


def weights_digest(folder: Path) -> str:
    """sha256 of a model folder's config.json and weight files, by content (a copy has the same digest)."""
    names = sorted(p.name for p in folder.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    lines = "".join(f"{name} {_file_digest(folder / name)}\n" for name in names)
    return hashlib.sha256(lines.encode()).hexdigest()


def same_base(recorded: dict, found: dict) -> bool:
    """Whether two records name the same weights (see the module's docstring)."""
    if "hub" in (recorded["kind"], found["kind"]):
        revisions = (recorded.get("revision"), found.get("revision"))
        return (
            recorded["kind"] == found["kind"]
            and recorded["id"] == found["id"]
            and (None in revisions or revisions[0] == revisions[1])
        )
    return bool(_names(recorded) & _names(found))


def describe(record: dict) -> str:
    """A record in a few words, for one line of a message."""
    kind = record["kind"]
    if kind == "gguf":
        return (
            f"{record['file']} ({record['quantization']}, sha256 {record['sha256'][:12]}), dequantized in "
            f"{record['dequantized']}"
        )
    if kind == "hub":
        return f"hub model {record['id']} at revision {record.get('revision') or 'unknown'}"
    if kind == "folder":
        return f"folder {record['path']} (weights sha256 {record['weights_sha256'][:12]})"
    return f"{record['name']} (built in memory)"


def loadable(record: dict, model_name: str) -> str:
    """What ``from_pretrained`` (and so a PEFT adapter's ``base_model_name_or_path``) should name to load these
    weights: a GGUF's dequantized folder, a folder's path, a hub id; a built-in model has none (its name)."""
    field = LOADABLE.get(record["kind"])
    return record[field] if field else model_name


def record_problem(record: object) -> str | None:
    """Why ``record`` is no valid base record (None when it is one): for a one-line error naming the file."""
    if not isinstance(record, dict):
        return "expected an object"
    kind = record.get("kind")
    if kind not in KINDS:
        return f"kind {kind!r:.40} (expected one of {', '.join(KINDS)})"
    fields = FIELDS[kind]
    extra = sorted(set(record) - set(fields) - {"kind"})
    if extra:
        return f"unknown field {extra[0]!r:.40} for kind {kind!r} (expected {', '.join(fields)})"
    for name, what in fields.items():
        value = record.get(name)
        if value is None and what.startswith("optional"):
            continue
        if not isinstance(value, str) or not value.strip():
            return f"{name} {value!r:.60} (expected {'a sha256 in hex' if 'sha256' in what else 'a text'})"
        if "sha256" in what and not SHA256.fullmatch(value):
            return f"{name} {value!r:.60} (expected a sha256: 64 lowercase hex digits)"
    return None


def check_same_base(recorded: dict | None, model_name: str, where: str) -> None:
    """Refuse ``model_name`` when its weights are not the recorded ones (a ``ConfigError`` of one line naming
    both). Nothing recorded (an artifact saved before the record existed): nothing to compare, accepted."""
    if recorded is None:
        return
    found = base_identity(model_name)
    if not same_base(recorded, found):
        raise ConfigError(
            f"--model {model_name!r:.200} is not the base {where} was trained on: trained on {describe(recorded)}; "
            f"--model is {describe(found)} (--force-base serves it anyway)"
        )


# --- the parts of a record ---


def _names(record: dict) -> set[str]:
    """What names a record's weights, any one of which another record may share."""
    kind = record["kind"]
    if kind == "gguf":
        names = {f"gguf:{record['sha256']}"}
        return names | ({f"weights:{record['weights_sha256']}"} if record.get("weights_sha256") else set())
    if kind == "folder":
        return {f"weights:{record['weights_sha256']}"}
    return {f"builtin:{record['name']}"}


def _gguf(path: Path) -> dict:
    from fedrouter.model.loading import dequantized_folder

    folder = dequantized_folder(path)
    return {
        "kind": "gguf",
        "file": path.name,
        "sha256": _file_digest(path),
        "quantization": gguf_quantization(path),
        "dequantized": str(folder.resolve()),
        "weights_sha256": weights_digest(folder),
    }


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def _cached_revision(model_id: str) -> str | None:
    """The commit of a hub model in the local hub cache (what transformers loads, and sets as
    ``config._commit_hash``), or None where it is not cached. Never goes online."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid repository id
        return None
    return Path(found).parent.name if isinstance(found, str) else None


# GGUF value types: struct formats of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def gguf_quantization(path: Path) -> str:
    """The quantization of a GGUF file as its header's ``general.file_type`` names it (``Q4_1``), read without
    the tensors; 'unknown' where the header does not say."""
    try:
        with path.open("rb") as handle:
            file_type = _gguf_file_type(handle)
    except (OSError, struct.error, ValueError) as err:
        raise ModelError(f"{path}: not a readable GGUF file ({err})") from None
    if file_type is None:
        return "unknown"
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {file_type}"


def _gguf_file_type(handle: BinaryIO) -> int | None:
    if handle.read(4) != b"GGUF":
        raise ValueError("no GGUF magic number")
    (version,) = struct.unpack("<I", handle.read(4))
    if not 2 <= version <= 3:  # version 1 counts in 32 bits; a big-endian file reads as a huge version
        return None
    _tensors, entries = struct.unpack("<QQ", handle.read(16))
    for _ in range(entries):
        key = _read_string(handle)
        (kind,) = struct.unpack("<I", handle.read(4))
        if key == "general.file_type" and kind in _SCALARS:
            return int(struct.unpack(_SCALARS[kind], handle.read(struct.calcsize(_SCALARS[kind])))[0])
        _skip(handle, kind)
    return None


def _read_string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(length).decode("utf-8", errors="replace")


def _skip(handle: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[kind]), os.SEEK_CUR)
    elif kind == _STRING:
        (length,) = struct.unpack("<Q", handle.read(8))
        handle.seek(length, os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = struct.unpack("<IQ", handle.read(12))
        if item in _SCALARS:
            handle.seek(count * struct.calcsize(_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip(handle, item)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")
