"""The router artifact: everything needed to route and serve after training, in open formats.

Layout of ``RUN_DIR/router/``::

    router.json                  base model, LoRA settings, embedding space, cluster counts, format version,
                                 cluster_names: {"cluster_<g>": readable name} (absent in older artifacts),
                                 base: the exact base weights (``fedrouter.model.identity``; absent in older ones)
    global_centroids.npy         (num_global, hidden) float32
    local_centroids.safetensors  one (num_local, hidden) tensor per client, key "client_<id>"
    cluster_map.json             {"<client>": [global cluster of each local cluster, ...]}
    adapters/cluster_<g>/        a PEFT adapter (adapter_config.json + adapter_model.safetensors),
                                 loadable with ``PeftModel.from_pretrained(base, path)``

No pickle anywhere. The folder is written beside and renamed into place.

The adapter ids ``cluster_<g>`` never change; ``cluster_names`` describes each one (``fedrouter.algorithm.naming``:
the majority task and its share where clients reported labels, else the id). ``rename_clusters`` (``fedrouter
rename``) rewrites only these names, atomically, and ``read_names`` reads them without the weights; an artifact
without them loads with every name its id.

``base`` records the weights the adapters were trained on (a GGUF file's name, sha256 and quantization and its
dequantized folder; a hub id's revision; a folder's path and weights digest: ``fedrouter.model.identity``), made
when the artifact is saved. Each adapter_config.json's ``base_model_name_or_path`` names what loads those weights
(the dequantized folder for a GGUF, not the hub id it was quantized from). ``check_base`` (``fedrouter serve
--model``) refuses another base. An artifact without the record loads, and nothing is compared.

Loading checks every file before anything is routed or generated, and refuses the artifact with an
``ArtifactError`` of one line naming the file and what was expected: router.json's settings of the right type and
range; the centroids and adapters readable, float and finite; cluster counts, client ids and widths that agree
across the files; each adapter's tensors of rank ``lora.r`` and the same in every cluster, its adapter_config.json
agreeing with router.json. ``check_model`` (called by ``Router``) then checks the artifact against the loaded base
model: the width its embeddings have, and every LoRA tensor its modules take, with its shape.

Symbolic links are refused, wherever they point (inside the folder or not): ``save`` never writes one, so a link
is something copied or placed there since, and the folder may come from elsewhere. Refusing them keeps the checked
files the files of this folder (no resolve-then-open race, no file of another run or of the system read as part
of the artifact, nothing that changes when the link's target changes). A file that is no regular file (a pipe, a
device) is refused as well.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file, save_file

from fedrouter.algorithm.naming import adapter_id, check_names, cluster_names
from fedrouter.config import FALLBACK_FACTOR
from fedrouter.discovery import KINDS, EmbeddingSettings
from fedrouter.errors import ArtifactError, ConfigError, FedRouterError
from fedrouter.model import LoraSettings, identity
from fedrouter.runlog import atomic_write

if TYPE_CHECKING:
    from fedrouter.model.loading import BaseModel

log = logging.getLogger("fedrouter")

FORMAT_VERSION = 1
ROUTER_DIR = "router"
# How an artifact written before the embedding settings existed embedded prompts: the raw text, last layer, unscaled.
LEGACY_EMBEDDING = EmbeddingSettings("text", 1.0, "none")
# What router.json must hold (``embedding`` may be missing: an artifact written before it existed).
REQUIRED = (
    "format_version",
    "base_model",
    "model_name",
    "precision",
    "max_seq_len",
    "num_global_clusters",
    "hidden_size",
    "lora",
)
PRECISIONS = ("auto", "bf16", "fp32")  # the model.precision setting's values
MIN_SEQ_LEN = 16  # the model.max_seq_len setting's least value


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
    folder: Path | None = None  # where it was loaded from (None: built in memory); named in error messages
    names: list[str] | None = None  # one readable name per global cluster, in cluster order (None: the ids)
    # The exact base weights (``identity.base_identity``); None: made from model_name when saved.
    base_identity: dict | None = None
    # Each global cluster's radius (``routing.cluster_radii``); None: not known (privacy, an older artifact).
    radii: np.ndarray | None = None
    # The run's routing.fallback and routing.fallback_factor: where a prompt far from its cluster goes.
    fallback: str = "none"
    fallback_factor: float = FALLBACK_FACTOR

    def __post_init__(self) -> None:
        if self.names is None:
            self.names = [adapter_id(g) for g in range(self.num_global)]
        if len(self.names) != self.num_global:
            raise ValueError(f"{len(self.names)} cluster names for {self.num_global} global clusters")
        check_names(dict(enumerate(self.names)))

    @property
    def num_global(self) -> int:
        return len(self.global_centroids)

    def with_task_names(self, cluster_tasks: Mapping[int | str, Mapping[str, int]]) -> RouterArtifact:
        """This artifact with each cluster named after its training samples per task (``naming.cluster_names``;
        metrics.json's ``clustering.global_cluster_tasks``)."""
        return replace(self, names=cluster_names(cluster_tasks, self.num_global))

    def save(self, run_dir: Path, *, adapter_base: str | None = None) -> Path:
        """Write ``RUN_DIR/router`` (beside, then renamed into place). ``adapter_base``: what each
        adapter_config.json names as its base (default: what loads the recorded base weights)."""
        target = Path(run_dir) / ROUTER_DIR
        record = self.base_identity or _base_record(self.model_name)
        tmp = Path(tempfile.mkdtemp(prefix=".router-", dir=run_dir))
        try:
            lora = self.lora.peft_config(
                adapter_base or (identity.loadable(record, self.base_model) if record else self.base_model)
            )
            if record is not None and record["kind"] == "hub":
                lora.revision = record["revision"]
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
                "cluster_names": {adapter_id(g): name for g, name in enumerate(self.names)},
                "hidden_size": int(self.global_centroids.shape[1]),
                "lora": self.lora.peft_fields(),
            }
            if record is not None:
                meta["base"] = record
            if self.radii is not None:
                meta["cluster_radii"] = [float(r) for r in self.radii]
            meta["fallback"] = {"route": self.fallback, "factor": self.fallback_factor}
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
        """Read ``RUN_DIR/router`` (or a router folder itself), checking every file: see the module's docstring."""
        folder, meta_path = _router_json(Path(run_dir))
        meta = _meta(_json(meta_path), meta_path)
        num_global, width = meta["num_global_clusters"], meta["hidden_size"]
        lora = _lora(meta["lora"], meta_path)

        centroids = _centroids(_entry(folder, "global_centroids.npy"), num_global)
        cluster_map = _cluster_map(_entry(folder, "cluster_map.json"), num_global)
        local_path = _entry(folder, "local_centroids.safetensors")
        local = _local_centroids(local_path, cluster_map)
        _check_widths(folder, width, centroids, local)

        adapters_dir = _entry(folder, "adapters", folder=True)
        expected = {f"cluster_{g}" for g in range(num_global)}
        extra = sorted(
            name for name in os.listdir(adapters_dir) if name.startswith("cluster_") and name not in expected
        )
        if extra:
            raise ArtifactError(
                f"{adapters_dir}: holds {_show(extra[0])}, but router.json has num_global_clusters {num_global} "
                f"(expected cluster_0 to cluster_{num_global - 1} only)"
            )
        adapters: dict[int, dict[str, np.ndarray]] = {}
        for g in range(num_global):
            path = _entry(folder, f"adapters/cluster_{g}/adapter_model.safetensors")
            adapters[g] = _adapter(path, lora, adapters.get(0), folder)
            _adapter_config(_entry(folder, f"adapters/cluster_{g}/adapter_config.json"), lora)
        return cls(
            base_model=meta["base_model"],
            model_name=meta["model_name"],
            lora=lora,
            global_centroids=centroids,
            local_centroids=local,
            cluster_map=cluster_map,
            adapters=adapters,
            precision=meta["precision"],
            max_seq_len=meta["max_seq_len"],
            embedding=meta["embedding"],
            folder=folder,
            names=_names(meta.get("cluster_names"), num_global, meta_path),
            base_identity=_base(meta.get("base"), meta_path),
            **_fallback(meta, num_global, meta_path),
        )

    def check_model(self, base: BaseModel) -> None:
        """Refuse a base model this artifact does not fit: the width its embeddings have must be the centroids',
        its LoRA settings the recorded ones, and its LoRA modules those the adapters hold, tensor for tensor."""
        from fedrouter.model import lora as lora_weights

        width = base.hidden_size * self.embedding.num_parts
        if width != self.global_centroids.shape[1]:
            raise ArtifactError(
                f"{self._where('global_centroids.npy')}: centroids are {self.global_centroids.shape[1]} wide, but "
                f"model {_show(base.name)} embeds prompts in {width} dimensions ({self.embedding.num_parts} x hidden size "
                f"{base.hidden_size}, embedding kind {self.embedding.kind!r}): load the router with the model it "
                "was trained on"
            )
        config = base.lora
        loaded = (int(config.r), float(config.lora_alpha), tuple(sorted(config.target_modules or ())))
        recorded = (self.lora.r, self.lora.alpha, tuple(sorted(self.lora.target_modules)))
        if loaded != recorded:
            raise ArtifactError(
                f"{self._where('router.json')}: LoRA r, alpha and modules {recorded} (the model was loaded with "
                f"{loaded}: load it with the artifact's LoRA settings)"
            )
        shapes = lora_weights.adapter_shapes(base)
        for g, arrays in sorted(self.adapters.items()):
            path = self._where(f"adapters/cluster_{g}/adapter_model.safetensors")
            missing = [key for key in shapes if key not in arrays]
            if missing:
                raise ArtifactError(
                    f"{path}: no tensor {missing[0]!r} ({len(missing)} of the {len(shapes)} LoRA tensors model "
                    f"{_show(base.name)} has for {', '.join(recorded[2])} are missing)"
                )
            for key, array in arrays.items():
                if key not in shapes:
                    raise ArtifactError(
                        f"{path}: tensor {_show(key)} is no LoRA weight of model {_show(base.name)} "
                        f"(expected keys such as {next(iter(shapes))!r})"
                    )
                if tuple(array.shape) != shapes[key]:
                    raise ArtifactError(
                        f"{path}: tensor {_show(key)} has shape {tuple(array.shape)}, expected {shapes[key]} "
                        f"(LoRA r={self.lora.r} on model {_show(base.name)})"
                    )

    def _where(self, name: str) -> str:
        return str(self.folder / name) if self.folder is not None else f"router artifact {name}"

    def adapter_path(self, run_dir: str | Path, g: int) -> Path:
        return Path(run_dir) / ROUTER_DIR / "adapters" / f"cluster_{g}"


def read_names(run_dir: str | Path) -> list[str]:
    """Every cluster's name, in cluster order, from ``RUN_DIR/router/router.json`` alone (no weights are read):
    for a run summary or a model card. An artifact without names gives the ids."""
    _, meta_path = _router_json(Path(run_dir))
    meta = _json(meta_path)
    return _names(meta.get("cluster_names"), _meta(meta, meta_path)["num_global_clusters"], meta_path)


def read_base(run_dir: str | Path) -> dict | None:
    """The recorded base weights (router.json's ``base``, checked) from ``RUN_DIR/router/router.json`` alone; None
    for an artifact saved before the record existed."""
    _, meta_path = _router_json(Path(run_dir))
    meta = _json(meta_path)
    _meta(meta, meta_path)
    return _base(meta.get("base"), meta_path)


def check_base(run_dir: str | Path, model_name: str) -> None:
    """Refuse to serve ``run_dir`` on ``model_name`` when its weights are not the ones the adapters were trained
    on: a ``ConfigError`` of one line naming both (``identity.check_same_base``)."""
    identity.check_same_base(read_base(run_dir), model_name, str(run_dir))


def rename_clusters(run_dir: str | Path, renames: Mapping[str, str]) -> list[str]:
    """Give clusters new names in ``RUN_DIR/router`` (or a router folder itself): ``{"cluster_2": "summaries"}``.

    Each name is stripped of space at its ends, then checked as every name is (``naming.name_problem``, unique
    among all the clusters' names). Only router.json's ``cluster_names`` changes, written whole beside and renamed
    over the old file. An unknown id or a bad name is a ``ConfigError`` of one line, and nothing is written.
    Returns every cluster's name, in cluster order.
    """
    folder, meta_path = _router_json(Path(run_dir))
    meta = _json(meta_path)
    num_global = _meta(meta, meta_path)["num_global_clusters"]
    names = _names(meta.get("cluster_names"), num_global, meta_path)
    ids = [adapter_id(g) for g in range(num_global)]
    if not renames:
        raise ConfigError("rename: no CLUSTER=NAME given")
    for key, name in renames.items():
        if key not in ids:
            raise ConfigError(f"rename: {key!r:.80} is no adapter of {folder} (expected {ids[0]} to {ids[-1]})")
        names[ids.index(key)] = name.strip() if isinstance(name, str) else name
    renamed = [ids.index(key) for key in renames]
    try:  # the clusters renamed last: a name already taken is reported on the cluster given it
        check_names({g: names[g] for g in [*(g for g in range(num_global) if g not in renamed), *renamed]})
    except ValueError as err:
        raise ConfigError(f"rename: {err}") from None
    meta["cluster_names"] = dict(zip(ids, names, strict=True))
    atomic_write(meta_path, json.dumps(meta, indent=2))
    return names


# --- reading and checking the files (each failure: an ArtifactError of one line naming the file) ---


def _router_json(run_dir: Path) -> tuple[Path, Path]:
    """The router folder (``RUN_DIR/router``, or ``run_dir`` itself when it is one) and its router.json."""
    folder = _entry(run_dir, ROUTER_DIR, folder=True) if os.path.lexists(run_dir / ROUTER_DIR) else run_dir
    meta_path = folder / "router.json"
    if not os.path.lexists(meta_path):
        raise ArtifactError(f"{run_dir}: no router artifact (expected {meta_path})")
    return folder, _entry(folder, "router.json")


def _names(entry: object, num_global: int, path: Path) -> list[str]:
    """router.json's ``cluster_names``: one valid, unique name per adapter id; absent (an older artifact): the ids."""
    ids = [adapter_id(g) for g in range(num_global)]
    if entry is None:
        return ids
    if not isinstance(entry, dict) or sorted(entry) != sorted(ids):
        found = f"has keys {_show(sorted(entry))}" if isinstance(entry, dict) else f"is {_kind(entry)}"
        raise ArtifactError(
            f"{path}: cluster_names {found} (expected an object with one name for each of {ids[0]} to "
            f"{ids[-1]}: num_global_clusters is {num_global})"
        )
    names = [entry[key] for key in ids]
    try:
        check_names(dict(enumerate(names)))
    except ValueError as err:
        raise ArtifactError(f"{path}: cluster_names: {err}") from None
    return names


def _base(entry: object, path: Path) -> dict | None:
    """router.json's ``base`` record, checked (``identity.record_problem``); absent (an older artifact): None."""
    if entry is None:
        return None
    problem = identity.record_problem(entry)
    if problem is not None:
        raise ArtifactError(f"{path}: base: {problem}")
    return entry


def _fallback(meta: dict, num_global: int, path: Path) -> dict:
    """router.json's ``cluster_radii`` (one finite number >= 0 per cluster) and ``fallback`` (``route``: none, base
    or a cluster's index; ``factor`` > 0); absent (an older artifact): no radii, no fallback."""
    radii = meta.get("cluster_radii")
    if radii is not None:
        numbers = isinstance(radii, list) and all(_number(r) and 0 <= r < float("inf") for r in radii)
        if not numbers or len(radii) != num_global:
            raise ArtifactError(
                f"{path}: cluster_radii {_show(radii)} (expected {num_global} finite numbers >= 0, one per cluster)"
            )
        radii = np.asarray(radii, dtype=np.float64)
    entry = meta.get("fallback", {"route": "none", "factor": FALLBACK_FACTOR})
    if not isinstance(entry, dict) or set(entry) != {"route", "factor"}:
        raise ArtifactError(f"{path}: fallback {_show(entry)} (expected an object with route and factor)")
    try:
        route, factor = check_fallback(entry["route"], entry["factor"], num_global, radii is not None)
    except ValueError as err:
        raise ArtifactError(f"{path}: fallback: {err}") from None
    return {"radii": radii, "fallback": route, "fallback_factor": factor}


def check_fallback(route: object, factor: object, num_global: int, has_radii: bool) -> tuple[str, float]:
    """A fallback route and factor, checked against the router: ``ValueError`` naming what is wrong."""
    targets = f"'none', 'base' or a cluster's index 0 to {num_global - 1}"
    if not isinstance(route, str) or not (route in ("none", "base") or (route.isdigit() and int(route) < num_global)):
        raise ValueError(f"route {_show(route)} (expected {targets})")
    if not _number(factor) or not 0 < factor < float("inf"):
        raise ValueError(f"factor {_show(factor)} (expected a finite number > 0)")
    if route != "none" and not has_radii:
        raise ValueError(f"route {route!r} needs the clusters' radii, which this router does not record")
    return route, float(factor)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _base_record(model_name: str) -> dict | None:
    """The base record of a model name; where it cannot be made (a file gone since training), none, with a
    warning: an artifact without it still serves."""
    try:
        return identity.base_identity(model_name)
    except (OSError, FedRouterError) as err:
        log.warning("router artifact: no record of the base model %r (%s)", model_name, err)
        return None


def _line(err: BaseException) -> str:
    """A library's message about a damaged file, on one line and short."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _show(value: object) -> str:
    """A value read from a file, for a message: its repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _entry(root: Path, relative: str, *, folder: bool = False) -> Path:
    """``root/relative``, each part of it checked: present, not a symbolic link, a folder (every part but the last,
    and the last if ``folder``) or else a regular file."""
    path = root
    parts = Path(relative).parts
    for i, part in enumerate(parts):
        path = path / part
        is_last = i == len(parts) - 1
        directory = folder or not is_last
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise ArtifactError(
                f"{path}: missing (expected the router artifact's {'folder' if directory else 'file'} {relative})"
            ) from None
        except OSError as err:
            raise ArtifactError(f"{path}: cannot be read ({_line(err)})") from None
        if stat.S_ISLNK(mode):
            raise ArtifactError(
                f"{path}: a symbolic link (a router artifact holds its own files and folders: copy the target in)"
            )
        if directory and not stat.S_ISDIR(mode):
            raise ArtifactError(f"{path}: not a folder (expected the router artifact's folder {part})")
        if not directory and not stat.S_ISREG(mode):
            raise ArtifactError(f"{path}: not a regular file (expected the router artifact's file {relative})")
    return path


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (OSError, ValueError, RecursionError) as err:
        raise ArtifactError(f"{path}: not readable JSON ({_line(err)})") from None


def _integer(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _meta(meta: object, path: Path) -> dict:
    """router.json's settings, each of the right type and range (``embedding`` replaced by its settings)."""
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: {_kind(meta)} at the top (expected an object of the router's settings)")
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {_show(meta['format_version'])} (expected {FORMAT_VERSION})")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: no {', '.join(missing)} (expected {', '.join(REQUIRED)})")
    for key in ("base_model", "model_name"):
        if not isinstance(meta[key], str) or not meta[key].strip():
            raise ArtifactError(f"{path}: {key} {_show(meta[key])} (expected a model name)")
    if meta["precision"] not in PRECISIONS:
        raise ArtifactError(f"{path}: precision {_show(meta['precision'])} (expected one of {', '.join(PRECISIONS)})")
    least = {"max_seq_len": MIN_SEQ_LEN, "num_global_clusters": 1, "hidden_size": 1}
    for key, bound in least.items():
        if not _integer(meta[key], bound):
            raise ArtifactError(f"{path}: {key} {_show(meta[key])} (expected a whole number >= {bound})")
    return meta | {"embedding": _embedding(meta.get("embedding", {"depth": 1.0, "scale": "none"}), path)}


def _lora(fields: object, path: Path) -> LoraSettings:
    names = ("r", "lora_alpha", "lora_dropout", "target_modules")
    if not isinstance(fields, dict) or any(name not in fields for name in names):
        raise ArtifactError(
            f"{path}: unreadable router artifact: LoRA settings 'lora' {_show(fields)}: expected r, lora_alpha, "
            "lora_dropout, target_modules"
        )
    modules = fields["target_modules"]
    number = (int, float)
    if not (
        isinstance(modules, list)
        and all(isinstance(m, str) for m in modules)
        and all(isinstance(fields[n], number) and not isinstance(fields[n], bool) for n in names[1:3])
    ):
        raise ArtifactError(
            f"{path}: unreadable router artifact: LoRA settings: lora_alpha and lora_dropout must be numbers and "
            "target_modules a list of module names"
        )
    try:
        return LoraSettings.from_peft_fields(fields)
    except (ValueError, OverflowError) as err:
        raise ArtifactError(f"{path}: unreadable router artifact: {_line(err)}") from None


def _matrix(path: Path, what: str, array: np.ndarray) -> np.ndarray:
    """A float array as float32, refused when of another dtype or not finite."""
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4, 8):
        raise ArtifactError(f"{path}: {what} holds {_show(str(array.dtype))} values (expected float32)")
    with np.errstate(over="ignore"):  # a float64 too large for float32 becomes infinite, refused below
        values = np.array(array, dtype=np.float32)
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ArtifactError(
            f"{path}: {what} has {bad} of {values.size} values not finite (NaN or infinite as float32; expected "
            "finite numbers)"
        )
    return values


def _centroids(path: Path, rows: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # a truncated file fails here, before any copy
    except Exception as err:  # whatever NumPy raises on a damaged file: the file is at fault
        raise ArtifactError(f"{path}: not a readable .npy array ({_line(err)})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ArtifactError(f"{path}: not a .npy array (expected one (num_global_clusters, hidden_size) array)")
    if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
        raise ArtifactError(
            f"{path}: shape {array.shape} (expected ({rows}, hidden_size): num_global_clusters of router.json)"
        )
    return _matrix(path, "the array", array)


def _tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError and the like on a damaged file: the file is at fault
        raise ArtifactError(f"{path}: not a readable safetensors file ({_line(err)})") from None


def _client_id(text: object) -> int | None:
    """The client of a 'client_<id>' or '<id>' key: a canonical whole number, or None."""
    if isinstance(text, str) and text.isascii() and text.isdigit() and str(int(text)) == text:
        return int(text)
    return None


def _cluster_map(path: Path, num_global: int) -> dict[int, list[int]]:
    entries = _json(path)
    if not isinstance(entries, dict) or not entries:
        raise ArtifactError(
            f"{path}: {_kind(entries)} at the top (expected an object of each client's global clusters: "
            '{"<client>": [g, ...]})'
        )
    cluster_map = {}
    for key, mapping in entries.items():
        client = _client_id(key)
        if client is None:
            raise ArtifactError(f"{path}: key {_show(key)} (expected client ids: '0', '1', ...)")
        if not (isinstance(mapping, list) and mapping and all(_integer(g, 0) and g < num_global for g in mapping)):
            raise ArtifactError(
                f"{path}: client {client}: {_show(mapping)} (expected a list of global clusters, each 0 to "
                f"{num_global - 1}: num_global_clusters of router.json is {num_global})"
            )
        cluster_map[client] = list(mapping)
    return cluster_map


def _local_centroids(path: Path, cluster_map: dict[int, list[int]]) -> dict[int, np.ndarray]:
    local = {}
    for key, array in _tensors(path).items():
        client = _client_id(key[len("client_") :]) if key.startswith("client_") else None
        if client is None or client not in cluster_map:
            raise ArtifactError(
                f"{path}: tensor {_show(key)} (expected one 'client_<id>' tensor per client of cluster_map.json)"
            )
        rows = len(cluster_map[client])
        if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
            raise ArtifactError(
                f"{path}: tensor {_show(key)} has shape {array.shape} (expected ({rows}, hidden_size): client {client} "
                f"has {rows} local clusters in cluster_map.json)"
            )
        local[client] = _matrix(path, f"tensor {_show(key)}", array)
    missing = sorted(set(cluster_map) - set(local))
    if missing:
        raise ArtifactError(f"{path}: no tensor 'client_{missing[0]}' (cluster_map.json has client {missing[0]})")
    return local


def _check_widths(folder: Path, width: int, centroids: np.ndarray, local: dict[int, np.ndarray]) -> None:
    """router.json's hidden_size, the global and the local centroids: one width; the odd one out is named."""
    found = centroids.shape[1]
    wrong_local = [c for c, v in sorted(local.items()) if v.shape[1] != found]
    if found != width and not wrong_local:
        raise ArtifactError(
            f"{folder / 'router.json'}: hidden_size {width}, but global_centroids.npy and "
            f"local_centroids.safetensors are {found} wide"
        )
    if found != width:
        raise ArtifactError(
            f"{folder / 'global_centroids.npy'}: centroids are {found} wide (expected {width}: hidden_size of "
            "router.json)"
        )
    if wrong_local:
        c = wrong_local[0]
        raise ArtifactError(
            f"{folder / 'local_centroids.safetensors'}: tensor 'client_{c}' is {local[c].shape[1]} wide (expected "
            f"{width}: hidden_size of router.json)"
        )


def _adapter(
    path: Path, lora: LoraSettings, first: dict[str, np.ndarray] | None, folder: Path
) -> dict[str, np.ndarray]:
    """One cluster's LoRA weights: float, finite, of rank lora.r, and the same tensors as cluster 0's."""
    tensors = _tensors(path)
    if not tensors:
        raise ArtifactError(f"{path}: no tensors (expected the cluster's LoRA weights)")
    arrays = {}
    for key, array in tensors.items():
        rank_axis = 0 if key.endswith("lora_A.weight") else 1 if key.endswith("lora_B.weight") else None
        if rank_axis is not None and (array.ndim != 2 or array.shape[rank_axis] != lora.r):
            raise ArtifactError(
                f"{path}: tensor {_show(key)} has shape {array.shape} (expected rank {lora.r}, the lora.r of router.json, "
                f"on axis {rank_axis})"
            )
        arrays[key] = _matrix(path, f"tensor {_show(key)}", array)
    if first is not None:
        reference = folder / "adapters" / "cluster_0" / "adapter_model.safetensors"
        missing = sorted(first.keys() - arrays.keys())
        if missing:
            raise ArtifactError(f"{path}: no tensor {_show(missing[0])} (cluster 0's adapter {reference} has it)")
        for key, array in arrays.items():
            if key not in first or first[key].shape != array.shape:
                raise ArtifactError(
                    f"{path}: tensor {_show(key)} of shape {array.shape} is not in cluster 0's adapter "
                    "(expected the same tensors and shapes in every cluster)"
                )
    return arrays


def _adapter_config(path: Path, lora: LoraSettings) -> None:
    """PEFT's config beside the weights (what ``PeftModel.from_pretrained`` reads) must agree with router.json."""
    config = _json(path)
    if not isinstance(config, dict):
        raise ArtifactError(f"{path}: {_kind(config)} at the top (expected PEFT's LoRA config object)")
    modules = config.get("target_modules")
    found = (
        config.get("peft_type"),
        config.get("r"),
        config.get("lora_alpha"),
        sorted(modules) if isinstance(modules, list) and all(isinstance(m, str) for m in modules) else modules,
    )
    expected = ("LORA", lora.r, lora.alpha, sorted(lora.target_modules))
    for name, got, want in zip(("peft_type", "r", "lora_alpha", "target_modules"), found, expected, strict=True):
        if got != want or isinstance(got, bool):
            raise ArtifactError(f"{path}: {name} {_show(got)} (expected {want!r}, as router.json records)")


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
        and not isinstance(settings.depth, bool)
        and 0 <= settings.depth <= 1
        and isinstance(settings.edge_depth, fraction)
        and not isinstance(settings.edge_depth, bool)
        and 0 <= settings.edge_depth <= 1
        and settings.scale in ("reference", "none")
        and isinstance(settings.edge_tokens, int)
        and not isinstance(settings.edge_tokens, bool)
        and settings.edge_tokens >= 1
    ):
        raise ArtifactError(expected)
    return settings
