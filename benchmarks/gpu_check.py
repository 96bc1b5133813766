"""GPU check of FedRouter's model layer: real model shapes, random weights, no download, no Flower or Ray.

    PYTHONPATH=src python benchmarks/gpu_check.py                  # on a GPU machine: CUDA, then the CPU for the ratio
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick   # the same code path on a CPU, small sizes

Needs only torch, transformers and peft (and the repository's `src/`, a few hundred KB). The models are built from
the configs of SmolLM2-135M and Llama-3.2-1B with random weights, and a word-level tokenizer over their vocabulary
is built in code, so nothing is downloaded and the 98 MB embedded model stays behind. For each device and each of
bf16 / fp32 it times, through `fedrouter.model` (the code runs use):

- a LoRA training step (`compute.train_adapter`, batch 8 x 256 tokens): tokens per second;
- embedding (`compute.embed`, 64 texts of 256 tokens, the routing layer): texts per second;
- batched generation over four adapters at once (`decoding.decode`, 16 prompts, PEFT's mixed-adapter batch):
  new tokens per second, and whether each row's greedy answer equals that adapter's answer alone (fp32; a CUDA
  kernel or mixed-batch bug shows here);

with the peak GPU memory of each. Writes benchmarks/results/gpu.json (``--out``). Under 10 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedrouter.model import LoraSettings, compute, decoding, lora  # noqa: E402
from fedrouter.model.loading import wrap_base_model  # noqa: E402

# The two models' published configs (hidden sizes, layers, heads, vocabulary, RoPE), weights random.
CONFIGS = {
    "SmolLM2-135M": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "Llama-3.2-1B": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per token id ("t0" .. "tN"): texts of random ids tokenize to exactly those ids."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t1", eos_token="t2", unk_token="t3")


def build(name: str, device: torch.device, dtype: torch.dtype):
    config = LlamaConfig(**CONFIGS[name], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = word_tokenizer(config.vocab_size)
    return wrap_base_model(name, model, tokenizer, dtype, LoraSettings(dropout=0.0).peft_config(name), device)


def text(rng: np.random.Generator, vocab: int, length: int) -> str:
    return " ".join(f"t{i}" for i in rng.integers(4, vocab, length))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def check(name: str, device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    rng = np.random.default_rng(0)
    base = build(name, device, dtype)
    vocab = base.model.get_base_model().config.vocab_size
    seq, steps, texts, rows, new = (64, 2, 8, 4, 8) if quick else (256, 5, 64, 16, 32)
    result: dict = {}

    # LoRA training: batch 8 x seq tokens.
    examples = [
        ([int(i) for i in rng.integers(4, vocab, seq)], [int(i) for i in rng.integers(4, vocab, seq)])
        for _ in range(16)
    ]
    compute.train_adapter(base, examples, steps=1, batch_size=8, lr=1e-4, seed=0)  # warm-up
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    losses = compute.train_adapter(base, examples, steps=steps, batch_size=8, lr=1e-4, seed=0)
    sync(device)
    elapsed = time.perf_counter() - started
    result["train"] = {
        "tokens_per_s": round(8 * seq * steps / elapsed, 1),
        "seconds_per_step": round(elapsed / steps, 4),
        "finite_loss": bool(np.isfinite(losses).all()),
        "peak_mib": peak_mib(device),
    }

    # Embedding at the routing layer (depth 0.2).
    layer = compute.embedding_layer(base, 0.2)
    batch = [text(rng, vocab, seq) for _ in range(texts)]
    compute.embed(base, batch[:2], layer=layer, max_len=seq)
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    points = compute.embed(base, batch, layer=layer, max_len=seq)
    sync(device)
    elapsed = time.perf_counter() - started
    result["embed"] = {
        "texts_per_s": round(texts / elapsed, 2),
        "finite": bool(np.isfinite(points).all()),
        "peak_mib": peak_mib(device),
    }

    # Generation: four adapters with distinct random weights, one batch that mixes them.
    shapes = lora.adapter_shapes(base)
    adapters = {g: {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in shapes.items()} for g in range(4)}
    decoding.load_adapters(base, adapters)
    prompts = [[int(i) for i in rng.integers(4, vocab, int(rng.integers(seq // 4, seq)))] for _ in range(rows)]
    slots = [decoding.adapter_slot(i % 4) for i in range(rows)]
    mixed = [decoding.Row(p, s, decoding.Sampling(new)) for p, s in zip(prompts, slots, strict=True)]
    decoding.decode(base, mixed[:2])
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    together = decoding.decode(base, mixed)
    sync(device)
    elapsed = time.perf_counter() - started
    alone = [decoding.decode(base, [row])[0] for row in mixed[:4]]
    same = sum(a.text == t.text for a, t in zip(alone, together[:4], strict=True))
    result["generate"] = {
        "new_tokens_per_s": round(sum(c.completion_tokens for c in together) / elapsed, 1),
        "seconds": round(elapsed, 3),
        "rows": rows,
        "adapters": 4,
        "rows_equal_to_their_adapter_alone": f"{same}/4",
        "peak_mib": peak_mib(device),
    }
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="small sizes (a CPU trial of the code path)")
    parser.add_argument("--no-cpu-ratio", action="store_true", help="on CUDA, skip the same figures on the CPU")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu to try the code path)")
    devices = [torch.device(args.device)]
    if args.device == "cuda" and not args.no_cpu_ratio:
        devices.append(torch.device("cpu"))
    record: dict = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "quick": args.quick,
        "results": {},
    }
    started = time.perf_counter()
    for name in args.models.split(","):
        for device in devices:
            for dtype in (torch.bfloat16, torch.float32):
                key = f"{name}/{device.type}/{str(dtype).removeprefix('torch.')}"
                if device.type == "cpu" and name != "SmolLM2-135M" and not args.quick and args.device == "cuda":
                    continue  # the 1B model on the CPU would take most of the 10 minutes: the ratio uses the 135M
                print(f"{key} ...", flush=True)
                record["results"][key] = check(name, device, dtype, args.quick)
                print(f"{key}: {json.dumps(record['results'][key])}", flush=True)
    results = record["results"]
    ratios = {}
    for name in args.models.split(","):
        for dtype in ("bfloat16", "float32"):
            gpu, cpu = results.get(f"{name}/cuda/{dtype}"), results.get(f"{name}/cpu/{dtype}")
            if gpu and cpu:
                ratios[f"{name}/{dtype} train gpu/cpu"] = round(
                    gpu["train"]["tokens_per_s"] / cpu["train"]["tokens_per_s"], 2
                )
        for device in ("cuda", "cpu"):
            bf16, fp32 = results.get(f"{name}/{device}/bfloat16"), results.get(f"{name}/{device}/float32")
            if bf16 and fp32:
                ratios[f"{name}/{device} train bf16/fp32"] = round(
                    bf16["train"]["tokens_per_s"] / fp32["train"]["tokens_per_s"], 2
                )
    record["ratios"] = ratios
    record["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} in {record['wall_s']} s")


if __name__ == "__main__":
    main()
