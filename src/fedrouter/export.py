"""``fedrouter export RUN OUT --format peft|merged|vllm``: a trained router for use outside FedRouter.

Layout of ``OUT`` (written beside, then renamed into place; an ``OUT`` that holds anything is refused)::

    README.md               the router's model card (huggingface_hub ``ModelCard``): clusters, exact base, routing
    export.json             what was exported: export_version, format, run, the base record, the adapters' base
    router/                 the router artifact (``fedrouter.serving.artifact``, router.json's format_version),
                            its adapters naming base/ as theirs: ``Router.load(OUT/router, model=OUT/base)``
    base/                   peft, vllm: the exact base weights, a model folder (a GGUF's dequantized folder or the
                            run's model folder, copied; ``link``: a symbolic link to it), or for a hub model only
                            base.json naming its id and revision
    adapters/cluster_<g>/   peft, vllm: a PEFT adapter (adapter_config.json, adapter_model.safetensors) and its
                            model card README.md
    merged/cluster_<g>/     merged: the base with that adapter merged in (PEFT ``merge_and_unload``), saved with
                            ``save_pretrained`` with its tokenizer and a model card
    vllm.sh                 vllm: the ``vllm serve`` command for base/ and every adapter, then ``fedrouter serve``
                            in front of it as the gateway

Each adapter_config.json's ``base_model_name_or_path`` is the absolute path of ``OUT/base`` as exported (for a hub
model: its id, with ``revision``), or ``adapter_base`` where given (say, the hub repository the base is pushed to).
Before anything is written the base is checked against the artifact's record (``fedrouter.model.identity``): the
weights copied are the ones the adapters were trained on, or the export is refused.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedrouter.algorithm.naming import adapter_id
from fedrouter.errors import ConfigError
from fedrouter.model import identity

if TYPE_CHECKING:
    from fedrouter.serving.artifact import RouterArtifact

FORMATS = ("peft", "merged", "vllm")
EXPORT_VERSION = 1
# Bases whose weights base/ holds as a copy of the recorded folder (a hub model is named; tiny-random is rebuilt).
COPIED = ("gguf", "folder")
# vLLM takes these --max-lora-rank values only (vllm/config/lora.py, MaxLoRARanks)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The run settings a model card lists (metrics.json's "config"), where the run folder has them.
CARD_SETTINGS = (
    "run.method",
    "run.rounds",
    "run.seed",
    "data.source",
    "data.scenario",
    "data.num_clients",
    "model.name",
    "model.precision",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "train.local_steps",
    "train.batch_size",
    "train.lr",
    "cluster.embedding",
    "cluster.global_k",
)
GGUF_NOTE = (
    "These are the weights the adapters were trained on: **dequantized from the {quantization} GGUF file {file}**"
    "{origin}. They are not the hub's full-precision weights of that model: an adapter put on other weights answers "
    "differently, and nothing would tell you."
)


@dataclass(frozen=True)
class Exported:
    out: Path
    commands: tuple[str, ...] = ()  # vllm: the two command lines of vllm.sh


@dataclass(frozen=True)
class Source:
    """What the export reads: the artifact, its base record, and the run's metrics where the run folder has them."""

    artifact: RouterArtifact
    record: dict
    metrics: dict
    run: Path

    @property
    def tasks(self) -> dict[int, dict[str, int]]:
        found = self.metrics.get("clustering", {}).get("global_cluster_tasks") or {}
        return {int(g): tasks for g, tasks in found.items() if str(g).isdigit()}

    @property
    def settings(self) -> dict:
        config = self.metrics.get("config") or {}
        return {key: config[key] for key in CARD_SETTINGS if key in config}


def export(
    run: str | Path,
    out: str | Path,
    fmt: str = "peft",
    *,
    link: bool = False,
    adapter_base: str | None = None,
    vllm_port: int = 8001,
    port: int = 8000,
) -> Exported:
    """Write ``run``'s router (a run folder or a router folder) to ``out`` in format ``fmt`` (see the module's
    docstring). ``link``: base/ links to the base's folder instead of copying it."""
    if fmt not in FORMATS:
        raise ConfigError(f"export: format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not (0 < vllm_port < 65536 and 0 < port < 65536):
        raise ConfigError(f"export: ports {vllm_port} (--vllm-port) and {port} (--port): expected 1 to 65535")
    source = _source(Path(run))
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"export: {out} exists and is not an empty folder (choose a new OUT)")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = source.record
    if adapter_base is None:
        adapter_base = record["id"] if record["kind"] == "hub" else str(out / "base")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    commands: tuple[str, ...] = ()
    try:
        artifact = replace(source.artifact, base_identity=record)
        artifact.save(tmp, adapter_base=adapter_base)
        if fmt in ("peft", "vllm"):
            _write_base(tmp / "base", source, link)
            for g in range(artifact.num_global):
                folder = tmp / "adapters" / adapter_id(g)
                shutil.copytree(tmp / "router" / "adapters" / adapter_id(g), folder)
                _adapter_card(source, g, adapter_base, out).save(folder / "README.md")
        if fmt == "merged":
            _write_merged(tmp, source)
        if fmt == "vllm":
            commands = vllm_commands(artifact, out, vllm_port=vllm_port, port=port)
            (tmp / "vllm.sh").write_text(_vllm_script(commands, vllm_port))
        manifest = {
            "export_version": EXPORT_VERSION,
            "format": fmt,
            "run": str(source.run.absolute()),
            "base": record,
            "adapter_base": adapter_base,
        }
        (tmp / "export.json").write_text(json.dumps(manifest, indent=2))
        _router_card(source, fmt, adapter_base, out).save(tmp / "README.md")
        _readable(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, commands)


def _readable(folder: Path) -> None:
    """Folders 755 and files 644 (vllm.sh 755), as an export is meant to be shared: temporary folders and
    safetensors files are made private (700, 600). A linked base is left as it is."""
    for root, folders, files in os.walk(folder):
        for name in folders:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o755 if name == "vllm.sh" else 0o644)
    folder.chmod(0o755)


def vllm_rank(r: int) -> int:
    """The least ``--max-lora-rank`` vLLM takes that holds adapters of rank ``r``."""
    fits = [rank for rank in VLLM_RANKS if rank >= r]
    if not fits:
        raise ConfigError(f"export: LoRA rank {r} is more than vLLM serves (at most {VLLM_RANKS[-1]})")
    return fits[0]


def vllm_commands(artifact: RouterArtifact, out: Path, *, vllm_port: int = 8001, port: int = 8000) -> tuple[str, str]:
    """The ``vllm serve`` command for OUT's base and adapters, and the ``fedrouter serve`` line in front of it."""
    record = artifact.base_identity
    hub = record["kind"] == "hub"
    base = record["id"] if hub else str(out / "base")
    dtype = "float32" if artifact.precision == "fp32" else "bfloat16"  # 'auto' computes in bf16 on a GPU
    vllm = ["vllm", "serve", base, "--port", str(vllm_port), "--dtype", dtype]
    if hub and record.get("revision"):
        vllm += ["--revision", record["revision"]]
    vllm += ["--enable-lora", "--max-lora-rank", str(vllm_rank(artifact.lora.r))]
    vllm += ["--max-loras", str(artifact.num_global), "--lora-modules"]
    vllm += [f"{adapter_id(g)}={out / 'adapters' / adapter_id(g)}" for g in range(artifact.num_global)]
    front = ["fedrouter", "serve", str(out / "router"), "--port", str(port)]
    if record["kind"] in COPIED:  # embed with the exported base: the same weights, as its record says
        front += ["--model", base]
    front += ["--backend", "vllm", "--vllm-url", f"http://127.0.0.1:{vllm_port}", "--vllm-model", base]
    return shlex.join(vllm), shlex.join(front)


# --- reading the run ---


def _source(run: Path) -> Source:
    from fedrouter.serving.artifact import RouterArtifact

    artifact = RouterArtifact.load(run)
    current = identity.base_identity(artifact.model_name)
    record = artifact.base_identity or current
    if not identity.same_base(record, current):
        raise ConfigError(
            f"export: model_name {artifact.model_name!r} no longer loads the weights {artifact.folder} was trained "
            f"on: trained on {identity.describe(record)}; now {identity.describe(current)}"
        )
    if record["kind"] == "gguf" and not Path(record["dequantized"]).is_dir():
        record = record | {"dequantized": current["dequantized"]}  # the same file, dequantized elsewhere
    run_dir = artifact.folder.parent
    metrics = {}
    if (run_dir / "metrics.json").is_file():
        try:
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
    return Source(artifact, record, metrics if isinstance(metrics, dict) else {}, run_dir)


# --- writing ---


def _write_base(target: Path, source: Source, link: bool) -> None:
    record = source.record
    if record["kind"] == "hub":
        target.mkdir()
        (target / "base.json").write_text(json.dumps({"id": record["id"], "revision": record["revision"]}, indent=2))
        return
    if record["kind"] == "builtin":  # a model built in memory (tests): saved, there is nothing to link to
        model, tokenizer = _plain_base(source)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return
    folder = Path(identity.loadable(record, source.artifact.model_name))
    if link:
        target.symlink_to(folder.resolve(), target_is_directory=True)
    else:
        shutil.copytree(folder, target, symlinks=False)


def _plain_base(source: Source):
    """The base model without any adapter slot (float32, as the dequantized weights are) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedrouter.model.loading import tiny_random

    record = source.record
    if record["kind"] == "builtin":
        return tiny_random(torch.float32)
    name = identity.loadable(record, source.artifact.model_name)
    revision = {"revision": record["revision"]} if record["kind"] == "hub" and record.get("revision") else {}
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, **revision)
    return model, AutoTokenizer.from_pretrained(name, **revision)


def _write_merged(tmp: Path, source: Source) -> None:
    from peft import PeftModel

    base, tokenizer = _plain_base(source)
    for g in range(source.artifact.num_global):
        folder = tmp / "merged" / adapter_id(g)
        model = PeftModel.from_pretrained(copy.deepcopy(base), tmp / "router" / "adapters" / adapter_id(g))
        model.merge_and_unload().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _merged_card(source, g).save(folder / "README.md")


def _vllm_script(commands: Sequence[str], vllm_port: int) -> str:
    vllm, front = commands
    return "\n".join(
        [
            "#!/bin/sh",
            "# Written by `fedrouter export --format vllm`. Starts vLLM (a GPU machine) with the exact base and every",
            "# adapter under its cluster id, waits until it answers, then puts FedRouter in front as the gateway that",
            "# embeds and routes each request (docs/serving.md, Export).",
            "set -e",
            f"{vllm} &",
            f"until curl -sf http://127.0.0.1:{vllm_port}/health >/dev/null; do sleep 2; done",
            f"exec {front}",
            "",
        ]
    )


# --- model cards ---


def _card(data: dict, body: str):
    from huggingface_hub import ModelCard, ModelCardData

    fields = {key: value for key, value in data.items() if value is not None}
    return ModelCard(f"---\n{ModelCardData(**fields).to_yaml()}\n---\n\n{body}")


def _hub_base(source: Source) -> str | None:
    """The hub id to name as ``base_model`` in a card's metadata: only where it is the exact base."""
    return source.record["id"] if source.record["kind"] == "hub" else None


def _metadata(source: Source, library: str, relation: str, extra: dict) -> dict:
    return {
        "library_name": library,
        "pipeline_tag": "text-generation",
        "tags": ["fedrouter", "lora", "federated-learning"],
        "base_model": _hub_base(source),
        "base_model_relation": relation if _hub_base(source) else None,
        "fedrouter": extra | {"base": source.record},
    }


def _base_section(source: Source, adapter_base: str | None) -> str:
    record = source.record
    rows = "\n".join(f"| {key} | `{value}` |" for key, value in record.items() if value is not None)
    lines = ["## Exact base model", "", identity.describe(record) + ".", "", "| field | value |", "|---|---|", rows, ""]
    if record["kind"] == "gguf":
        origin = f" (a quantization of {record['quantized_from']})" if record.get("quantized_from") else ""
        lines += [GGUF_NOTE.format(quantization=record["quantization"], file=record["file"], origin=origin), ""]
    if adapter_base is not None and record["kind"] != "hub":
        lines += ["This export's `base/` folder holds these weights: load the adapters on it.", ""]
    if adapter_base is not None:
        where = (
            f"the hub model `{record['id']}` at revision `{record.get('revision') or 'unknown'}`"
            if record["kind"] == "hub"
            else "the absolute path of this export's `base/` folder when it was written; after moving the export or "
            "pushing it to the hub, pass the base to `PeftModel.from_pretrained` yourself, or export again with "
            "`--adapter-base`"
        )
        lines += [f"Each adapter_config.json's `base_model_name_or_path` is `{adapter_base}`: {where}.", ""]
    return "\n".join(lines)


def _routing_section(source: Source) -> str:
    e = source.artifact.embedding
    return "\n".join(
        [
            "## How FedRouter routes",
            "",
            "A prompt (of a chat, its last user turn) is embedded by the base model as the run embedded its training "
            f"inputs (router.json's `embedding`: kind `{e.kind}`, depth {e.depth}, scale `{e.scale}`, edge depth "
            f"{e.edge_depth}, edge tokens {e.edge_tokens}), and answered by the adapter of the **nearest global "
            "centroid** (Euclidean distance to `router/global_centroids.npy`, one row per adapter). Local routing "
            '(`mode="local"`) takes a client\'s nearest local centroid (`router/local_centroids.safetensors`) and its '
            "global cluster (`router/cluster_map.json`). There is no fallback yet: every prompt goes to the nearest "
            "adapter, however far.",
            "",
        ]
    )


def _cluster_facts(source: Source, g: int) -> list[str]:
    tasks = source.tasks.get(g)
    clients = sorted(c for c, mapping in source.artifact.cluster_map.items() if g in mapping)
    total = sum(n for n in tasks.values() if n > 0) if tasks else 0
    if tasks and total:
        mix = ", ".join(
            f"{task} {n} ({100 * n // total}%)" for task, n in sorted(tasks.items(), key=lambda i: -i[1]) if n > 0
        )
    else:
        mix = "not known (the run's clients reported no task labels, or the run folder has no metrics.json)"
    return [
        f"- **Task mix** (training samples per task, as the clients reported labels): {mix}",
        f"- **Clients**: {len(clients)} of {len(source.artifact.cluster_map)} ("
        f"{', '.join(map(str, clients)) or 'none'}: those with a local cluster in this global cluster)",
        f"- **Samples**: {total if total else 'not known'} (labelled training samples of those local clusters)",
    ]


def _settings_section(source: Source) -> str:
    settings = source.settings
    if not settings:
        return "## Run settings\n\nNot known (the run folder has no metrics.json).\n"
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in settings.items())
    return f"## Run settings\n\n| setting | value |\n|---|---|\n{rows}\n"


def _adapter_card(source: Source, g: int, adapter_base: str, out: Path):
    artifact, cid = source.artifact, adapter_id(g)
    name, folder = artifact.names[g], out / "adapters" / cid
    base = source.record["id"] if source.record["kind"] == "hub" else str(out / "base")
    rank = str(vllm_rank(artifact.lora.r)) if artifact.lora.r <= VLLM_RANKS[-1] else f"{artifact.lora.r} (too high)"
    vllm = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", rank]
    body = "\n".join(
        [
            f"# {cid}" + (f": {name}" if name != cid else ""),
            "",
            f"A LoRA adapter of a FedRouter run: the adapter of global cluster {g} ({cid}, named '{name}'), one of "
            f"{artifact.num_global} that FedRouter's router chooses between (LoRA r={artifact.lora.r}, alpha "
            f"{artifact.lora.alpha}, modules {', '.join(artifact.lora.target_modules)}).",
            "",
            "## What trained it",
            "",
            *_cluster_facts(source, g),
            "",
            _settings_section(source),
            _base_section(source, adapter_base),
            "## Load it with PEFT",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="float32")',
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{folder}")',
            "```",
            "",
            "## Serve it with vLLM",
            "",
            "```bash",
            shlex.join([*vllm, "--lora-modules", f"{cid}={folder}"]),
            "```",
            "",
            f"Every adapter and FedRouter in front of them: `{out / 'vllm.sh'}` of `fedrouter export --format vllm`.",
            "",
            _routing_section(source),
        ]
    )
    return _card(_metadata(source, "peft", "adapter", {"cluster": cid, "name": name}), body)


def _merged_card(source: Source, g: int):
    cid, name = adapter_id(g), source.artifact.names[g]
    body = "\n".join(
        [
            f"# {cid}" + (f": {name}" if name != cid else "") + " (merged)",
            "",
            f"The base model with the LoRA adapter of global cluster {g} merged into its weights (PEFT "
            "`merge_and_unload`): a plain transformers model, `AutoModelForCausalLM.from_pretrained(this folder)`.",
            "",
            "## What trained the adapter",
            "",
            *_cluster_facts(source, g),
            "",
            _settings_section(source),
            _base_section(source, None),
            _routing_section(source),
        ]
    )
    return _card(_metadata(source, "transformers", "merge", {"cluster": cid, "name": name}), body)


def _router_card(source: Source, fmt: str, adapter_base: str, out: Path):
    from fedrouter.serving.artifact import FORMAT_VERSION

    artifact = source.artifact
    rows = []
    for g in range(artifact.num_global):
        facts = _cluster_facts(source, g)
        rows.append(f"| `{adapter_id(g)}` | {artifact.names[g]} | {facts[0].split(': ', 1)[1]} |")
    layout = {
        "peft": "`adapters/cluster_<g>/` (PEFT adapters, each with its model card) and `base/` (the exact base)",
        "vllm": "`adapters/cluster_<g>/`, `base/` and `vllm.sh` (vLLM with every adapter, FedRouter in front)",
        "merged": "`merged/cluster_<g>/` (the base with one adapter merged in, each with its model card)",
    }[fmt]
    body = "\n".join(
        [
            "# FedRouter router",
            "",
            f"{artifact.num_global} LoRA adapters, one per global cluster of a federated FedRouter run, and the "
            "router that picks one for each prompt. This export holds "
            f"{layout}, and `router/`: the router artifact (router.json `format_version` {FORMAT_VERSION}, "
            "centroids in NumPy `.npy` and safetensors, JSON for the rest, no pickle; docs/serving.md).",
            "",
            "| adapter | name | task mix |",
            "|---|---|---|",
            *rows,
            "",
            _settings_section(source),
            _base_section(source, adapter_base if fmt != "merged" else None),
            _routing_section(source),
            "## Serve it with FedRouter",
            "",
            "```bash",
            f"fedrouter serve {shlex.quote(str(out / 'router'))}"
            + (
                f" --model {shlex.quote(str(out / 'base'))}"
                if fmt != "merged" and source.record["kind"] in COPIED
                else ""
            ),
            "```",
            "",
            *(
                [f"With vLLM generating and FedRouter routing in front of it: `sh {out / 'vllm.sh'}`.", ""]
                if fmt == "vllm"
                else []
            ),
            "## Push it to the Hugging Face Hub",
            "",
            "```python",
            "from huggingface_hub import upload_folder",
            "",
            f'upload_folder(repo_id="you/your-router", folder_path="{out}", repo_type="model")',
            "```",
            "",
        ]
    )
    return _card(_metadata(source, "peft", "adapter", {"format": fmt, "adapters": artifact.num_global}), body)
