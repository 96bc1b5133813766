"""One 16-row decode step of the embedded model against what this machine allows.

    PYTHONPATH=src .venv/bin/python benchmarks/decode_step.py [--rows 16] [--adapters 4] [--steps 20]

Side by side in one run:
- the two hardware bounds of a decode step: the frozen weights read once at this machine's measured memory
  bandwidth (a large tensor summed, the best of several), and the step's FLOPs (counted by torch's
  ``FlopCounterMode``) at its measured matrix-product peak (a large product in the model's dtype);
- ``Batch.step`` of ``--rows`` rows (random prompts of paper4-raw-like length, each row on one of ``--adapters``
  random LoRA adapters), as the server and evaluation run it: through ``model.llama_step`` with the adapters
  stacked (``model.batched_lora``); through transformers' forward with the adapters stacked (before
  ``llama_step``); through it with PEFT's own mixed-adapter inference (before the stack); and through it with
  every row on the base model (no adapter at all). The four batches take their steps in turn, so a drift in this
  machine's speed slows all of them alike;
- where the step's time goes (``torch.profiler``, self CPU time by operator);
- the answers kept: ``--answers`` paper4-raw test prompts (chat template, greedy, 48 tokens, each on one of the
  adapters in turn), decoded as the server does and with PEFT's own mixed-adapter inference through
  transformers' forward, in the model's dtype: how many answers are the same text.

Writes benchmarks/results/decode_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from speed import matmul_peak, timed  # this folder is on sys.path when a benchmark runs
from torch.utils.flop_counter import FlopCounterMode

from fedrouter.bench import commit, machine
from fedrouter.model import LoraSettings, decoding, loading, lora
from fedrouter.model.prompts import prompt_ids

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "decode_step.json"
PAPER4_RAW_TEST = ROOT.parent / "shared" / "data" / "paper4-raw" / "test.jsonl"


def best_seconds(fn, repeats: int = 10, warmup: int = 2) -> float:
    return min(timed(fn, repeats, warmup)[1])


def memory_bandwidth() -> float:
    """Bytes/s read by summing a 1 GiB tensor (the best of several)."""
    data = torch.ones(2**28, dtype=torch.float32)
    return data.numel() * 4 / best_seconds(lambda: data.sum(), repeats=5)


def random_adapter(base: loading.BaseModel, seed: int) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(seed)
    return {
        name: (generator.standard_normal(shape) * 0.1).astype(np.float32)  # enough to change answers
        for name, shape in lora.adapter_shapes(base).items()
    }


def prefilled_batch(
    base, rows: int, adapters: list[str], prompt_tokens: int, stacked=True, lean=True
) -> decoding.Batch:
    generator = np.random.default_rng(0)
    batch = decoding.Batch(base, stacked=stacked, lean=lean)
    batch.eos = set()  # no row may finish while it is timed
    sampling = decoding.Sampling(max_new_tokens=10_000)
    lengths = generator.integers(prompt_tokens // 2, prompt_tokens * 3 // 2, rows)
    batch.add(
        [
            decoding.Row(generator.integers(100, 40_000, int(n)).tolist(), adapters[i % len(adapters)], sampling)
            for i, n in enumerate(lengths)
        ]
    )
    return batch


def step_seconds(batch: decoding.Batch, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        batch.step()
        times.append(time.perf_counter() - started)
    return times


def steps_in_turn(batches: dict[str, decoding.Batch], steps: int) -> dict[str, dict]:
    """Each batch's step times, the batches stepping in turn (after three warm-up steps each)."""
    times: dict[str, list[float]] = {name: [] for name in batches}
    for round_ in range(steps + 3):
        for name, batch in batches.items():
            took = step_seconds(batch, 1)[0]
            if round_ >= 3:
                times[name].append(took)
    return {
        name: {"step_s_median": statistics.median(t), "step_s_min": min(t), "width": batches[name].width}
        for name, t in times.items()
    }


def answers_kept(base, slots: list[str], count: int) -> dict:
    """Greedy answers to paper4-raw test prompts, as served vs PEFT's mixed batch: how many are the same."""
    lines = PAPER4_RAW_TEST.read_text(encoding="utf-8").splitlines()
    samples = [json.loads(line) for line in lines[:: max(1, len(lines) // count)]][:count]
    sampling = decoding.Sampling(max_new_tokens=48)
    rows = [
        decoding.Row(prompt_ids(base.tokenizer, s["instruction"], 256), slots[i % len(slots)], sampling)
        for i, s in enumerate(samples)
    ]
    stacked = decoding.decode(base, rows)
    forward = decoding.decode(base, rows, lean=False)
    peft = decoding.decode(base, rows, stacked=False)
    alone = decoding.decode(base, [decoding.Row(r.ids, decoding.BASE, sampling) for r in rows])
    # What another attention kernel alone does to the answers in this dtype: transformers' eager attention instead
    # of its SDPA kernel, through the same forward.
    model = base.model.get_base_model()
    kernel = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager = decoding.decode(base, rows, lean=False)
    finally:
        model.set_attn_implementation(kernel)
    return {
        "prompts": len(rows),
        "same_text": sum(a.text == b.text for a, b in zip(stacked, peft, strict=True)),
        "same_text_as_stacked_forward": sum(a.text == b.text for a, b in zip(stacked, forward, strict=True)),
        "eager_attention_same_text_as_stacked_forward": sum(
            a.text == b.text for a, b in zip(eager, forward, strict=True)
        ),
        "other_text_than_base_model": sum(a.text != b.text for a, b in zip(stacked, alone, strict=True)),
        "tokens": sum(c.completion_tokens for c in stacked),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--answers", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    base = loading.load_base_model("smollm2", precision=args.precision, lora=LoraSettings())
    slots = decoding.load_adapters(base, {g: random_adapter(base, g) for g in range(args.adapters)})
    weight_bytes = sum(p.numel() * p.element_size() for p in base.model.parameters())

    record: dict = {
        "command": " ".join(["PYTHONPATH=src .venv/bin/python benchmarks/decode_step.py", *sys.argv[1:]]),
        "commit": commit(args.out.parent),  # other results written there are no change of the code
        "machine": machine(),
        "dtype": str(base.dtype),
        "rows": args.rows,
    }
    batches = {
        "lean_step": prefilled_batch(base, args.rows, slots, args.prompt_tokens),
        "stacked_adapters": prefilled_batch(base, args.rows, slots, args.prompt_tokens, lean=False),
        "peft_mixed_adapters": prefilled_batch(base, args.rows, slots, args.prompt_tokens, stacked=False),
        "base_only": prefilled_batch(base, args.rows, [decoding.BASE], args.prompt_tokens, lean=False),
    }
    record |= steps_in_turn(batches, args.steps)
    peft = record["peft_mixed_adapters"]["step_s_median"]
    record["stacked_speedup_over_peft"] = peft / record["stacked_adapters"]["step_s_median"]
    record["lean_speedup_over_stacked"] = (
        record["stacked_adapters"]["step_s_median"] / record["lean_step"]["step_s_median"]
    )
    record["lean_speedup_over_peft"] = peft / record["lean_step"]["step_s_median"]
    del batches

    batch = prefilled_batch(base, args.rows, slots, args.prompt_tokens)
    step_seconds(batch, 3)
    # FlopCounterMode counts aten's products, not oneDNN's packed ones: count a step with plain weights (the same
    # products, bit for bit: llama_step.packed_weights).
    packed, batch._lean.packed = batch._lean.packed, {}
    with FlopCounterMode(display=False) as counter:
        batch.step()
    flops = counter.get_total_flops()
    batch._lean.packed = packed
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step_seconds(batch, 5)
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)

    record["answers_stacked_vs_peft"] = answers_kept(base, slots, args.answers)
    bandwidth = memory_bandwidth()
    peak = matmul_peak(base.dtype)
    step = record["lean_step"]["step_s_median"]
    record |= {
        "weight_bytes": weight_bytes,
        "step_flops": flops,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "matmul_peak_flops_per_s": peak,
        "bound_weights_read_s": weight_bytes / bandwidth,
        "bound_flops_s": flops / peak,
        "step_over_bandwidth_bound": step / (weight_bytes / bandwidth),
        "step_over_flops_bound": step / (flops / peak),
        "profile_top_ops": table,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table)
    print(json.dumps({k: v for k, v in record.items() if k != "profile_top_ops"}, indent=2))


if __name__ == "__main__":
    main()
