"""Speed of FedRouter on this machine: every figure measured side by side in one run, as a ratio.

    .venv/bin/python benchmarks/speed.py            # from the project root; about 40 minutes on 2 CPU cores
    .venv/bin/python benchmarks/speed.py --evaluation-phase COMMIT   # only: COMMIT's evaluation and this tree's

Writes benchmarks/results/speed.json (keys from ../shared/docs/BENCHMARK.md, plus the raw timings behind each
ratio). "Naive" and "reference-style" are the straightforward library paths the issue describes: fp32 weights,
the LM head over every position (``model(labels=...)``), the full causal-LM model with ``output_hidden_states``
for embeddings, and the base model reloaded for every client's work.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import get_peft_model, set_peft_model_state_dict
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from fedrouter.bench import PROFILES, PeakMemory, commit, machine
from fedrouter.config import Config
from fedrouter.data import all_clients, load_source
from fedrouter.model import compute, decoding, loading, lora
from fedrouter.model.prompts import embedding_ids, prompt_ids, training_ids

ROOT = Path(__file__).resolve().parents[1]
PAPER4 = ROOT.parent / "shared" / "data" / "paper4"
OUT = ROOT / "benchmarks" / "results" / "speed.json"
REPEATS = 3


def timed(fn, repeats: int = REPEATS, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def naive_model(base: loading.BaseModel):
    """The library-default path: fp32 weights, PEFT LoRA with the same config and initial weights."""
    model = AutoModelForCausalLM.from_pretrained(loading.resolve_folder("smollm2"), dtype=torch.float32)
    model.config.pad_token_id = base.tokenizer.pad_token_id
    wrapped = get_peft_model(model, base.lora)
    set_peft_model_state_dict(wrapped, {k: torch.from_numpy(v) for k, v in lora.get_adapter(base).items()})
    return wrapped


def training_batch(base, samples, size=8, max_len=256):
    rows = [training_ids(base.tokenizer, s.instruction, s.response, max_len) for s in samples[:size]]
    return (
        pad([r[0] for r in rows], base.tokenizer.pad_token_id),
        pad([[1] * len(r[0]) for r in rows], 0),
        pad([r[1] for r in rows], -100),
    )


def naive_step(model, optimizer, ids, mask, labels) -> float:
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def project_step(base, optimizer, ids, mask, labels) -> float:
    with compute.training_attention(base), base.autocast():
        loss = compute.answer_loss(base, ids, mask, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def matmul_peak(dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of a large matrix product in ``dtype`` on this machine (the best of several)."""
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    best, _ = timed(lambda: torch.mm(a, b), repeats=10, warmup=3)
    return 2 * 2048**3 / best


def bench_train_step(base, samples) -> dict:
    ids, mask, labels = training_batch(base, samples)
    start_adapter = lora.get_adapter(base)
    naive = naive_model(base)
    with torch.no_grad():  # first-step loss, without dropout: the same function computed two ways
        first_naive = float(naive(input_ids=ids, attention_mask=mask, labels=labels).loss)
        with base.autocast():
            first_project = float(compute.answer_loss(base, ids, mask, labels))
    naive.train()
    naive_opt = torch.optim.AdamW([p for p in naive.parameters() if p.requires_grad], lr=0.0)  # lr 0: same weights
    naive_s, naive_all = timed(lambda: naive_step(naive, naive_opt, ids, mask, labels))

    base.model.train()
    project_opt = torch.optim.AdamW([p for p in base.model.parameters() if p.requires_grad], lr=0.0)
    project_s, project_all = timed(lambda: project_step(base, project_opt, ids, mask, labels))
    with FlopCounterMode(display=False) as counter:
        project_step(base, project_opt, ids, mask, labels)
    base.model.eval()
    lora.set_adapter(base, start_adapter)
    flops = counter.get_total_flops()
    peak = matmul_peak()
    return {
        "train_step_speedup": naive_s / project_s,
        "train_step_naive_s": naive_s,
        "train_step_project_s": project_s,
        "train_step_naive_times": naive_all,
        "train_step_project_times": project_all,
        "train_batch_tokens": int(mask.sum()),
        "train_batch_shape": list(ids.shape),
        "first_step_loss_naive": first_naive,
        "first_step_loss_project": first_project,
        "first_step_loss_rel_diff": abs(first_naive - first_project) / first_naive,
        "train_step_flops": flops,
        "train_flops_per_s": flops / project_s,
        "bf16_matmul_peak_flops_per_s": peak,
        "train_flops_fraction_of_peak": flops / project_s / peak,
    }


def bench_embedding(base, samples) -> dict:
    texts = [s.instruction for s in samples[:32]]
    model = AutoModelForCausalLM.from_pretrained(loading.resolve_folder("smollm2"), dtype=torch.float32)
    model.eval()
    naive_s, _ = timed(lambda: naive_embed(model, base.tokenizer, texts, max_len=128))
    project_s, _ = timed(lambda: compute.embed(base, texts, batch_size=32, max_len=128))
    reference = naive_embed(model, base.tokenizer, texts, max_len=128)
    ours = torch.from_numpy(compute.embed(base, texts, batch_size=32, max_len=128))
    cosine = torch.nn.functional.cosine_similarity(reference, ours).min()
    return {
        "embed_speedup": naive_s / project_s,
        "embed_naive_s": naive_s,
        "embed_project_s": project_s,
        "embed_batch": [len(texts), 128],
        "embed_min_cosine_to_fp32": float(cosine),
    }


def bench_generation(base, samples) -> dict:
    """Greedy answers of 16 prompts (the adapter in the default slot) through ``decoding``, one at a time and 16
    rows at once."""
    prompts = [s.instruction for s in samples[:16]]
    rows = [decoding.Row(prompt_ids(base.tokenizer, p, 256), lora.SLOT, decoding.Sampling(32)) for p in prompts]
    count = lambda texts: sum(len(base.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)  # noqa: E731
    results = {}

    def one_at_a_time():
        results["single"] = [decoding.decode(base, [row], max_rows=1)[0].text for row in rows]

    def batched():
        results["batched"] = [done.text for done in decoding.decode(base, rows, max_rows=16)]

    single_s, _ = timed(one_at_a_time, repeats=1, warmup=0)
    batched_s, _ = timed(batched, repeats=1, warmup=1)
    same = sum(a == b for a, b in zip(results["single"], results["batched"], strict=True))
    return {
        "generate_speedup": single_s / batched_s,
        "generate_single_s": single_s,
        "generate_batched_s": batched_s,
        "generate_prompts": len(prompts),
        "generate_tokens_per_s_single": count(results["single"]) / single_s,
        "generate_tokens_per_s_batched": count(results["batched"]) / batched_s,
        "generate_same_answers": f"{same}/{len(prompts)}",
    }


def naive_embed(model, tokenizer, texts: list[str], batch_size: int = 32, max_len: int = 256) -> torch.Tensor:
    """Embeddings the library-default way: the full fp32 causal LM with ``output_hidden_states``."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            encoded = [embedding_ids(tokenizer, t, max_len) for t in texts[start : start + batch_size]]
            ids, mask = pad(encoded, tokenizer.pad_token_id), pad([[1] * len(e) for e in encoded], 0)
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            weights = mask.unsqueeze(-1).float()
            rows.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(rows)


def bench_round(base) -> dict:
    """FedRouter's first round of paper4-cpu `all` (8 clients x 96 samples): every client embeds its samples for
    clustering, then trains one local cluster's adapter for 4 steps of batch 8 (256 tokens). Client work only;
    the K-Means and the messages take well under a second in either pipeline."""
    cfg = Config(
        {
            "data.source": str(PAPER4),
            "data.num_clients": 8,
            "data.scenario": "all",
            "data.train_per_client": 96,
        }
    )
    clients = all_clients(cfg)
    # The local cluster each client trains this round: its samples of one task (round-robin over tasks).
    work = [(c, [s for s in c.train if s.task == c.tasks[i % len(c.tasks)]]) for i, c in enumerate(clients)]
    start_adapter = lora.get_adapter(base)

    def reference_style():
        for client, samples in work:
            model = naive_model(base)  # loaded for the embedding pass ...
            model.eval()
            naive_embed(model, base.tokenizer, [s.instruction for s in client.train])
            model = naive_model(base)  # ... and again for the training message, as the authors' code did
            model.train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
            for step in range(4):
                batch = [samples[(step * 8 + j) % len(samples)] for j in range(8)]
                ids, mask, labels = training_batch(base, batch)
                naive_step(model, optimizer, ids, mask, labels)

    def project():
        for i, (client, samples) in enumerate(work):
            compute.embed(base, [s.instruction for s in client.train])
            lora.set_adapter(base, start_adapter)
            examples = compute.encode_training(base, [(s.instruction, s.response) for s in samples], 256)
            compute.train_adapter(base, examples, steps=4, batch_size=8, lr=5e-4, seed=i)

    reference_s, _ = timed(reference_style, repeats=1, warmup=0)
    project_s, _ = timed(project, repeats=1, warmup=0)
    lora.set_adapter(base, start_adapter)
    return {
        "round_speedup_vs_reference_style": reference_s / project_s,
        "round_reference_style_s": reference_s,
        "round_project_s": project_s,
    }


def reference_setting(tmp: Path, adapter_dtype: str) -> dict:
    """The authors' CPU setting from the issue: 8 clients, single, 2 rounds of 5 steps of batch 8, 64 samples each.

    Run as `fedrouter run` in a fresh process, so its memory is the simulation's alone.
    """
    settings = {
        "data.source": str(PAPER4),
        "data.num_clients": 8,
        "data.scenario": "single",
        "data.train_per_client": 64,
        "data.test_per_task": 16,
        "run.rounds": 2,
        "train.local_steps": 5,
        "train.batch_size": 8,
        "train.adapter_dtype": adapter_dtype,
        "eval.sets": "personalized",
        "eval.routing": "local",
        "eval.max_new_tokens": 48,
        "run.output_dir": str(tmp),
        "run.name": f"reference-{adapter_dtype}",
    }
    command = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", *(f"{k}={v}" for k, v in settings.items())]
    started = time.perf_counter()
    with PeakMemory(include_self=False) as memory:  # the run's processes, not this script's own model
        subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    metrics = json.loads((tmp / settings["run.name"] / "metrics.json").read_text())
    return {
        "wall_s": wall,
        "rouge1": metrics["evaluation"]["overall"]["personalized/local"]["rouge1"],
        "peak_rss_mb": memory.peak / 2**20,
        "peak_pss_mb": memory.peak_pss / 2**20,
        "round_s": [r["seconds"] for r in metrics["rounds"]],
        "phases": {
            "clustering_s": metrics["phases"]["clustering_s"],
            "embed_s": metrics["phases"]["embed_s"],
            "training_s": metrics["phases"]["training_s"],
            "evaluation_s": metrics["evaluation_s"],
        },
        "bytes_per_client_round": metrics["rounds"][0]["bytes_up"] / settings["data.num_clients"],
        "model_loads_per_run": max(metrics["model_loads_per_process"], metrics["eval_model_loads_per_process"]),
        "cluster_acc_global": metrics["clustering"]["cluster_acc_global"],
    }


def quick_16bit(tmp: Path) -> dict:
    """FedRouter on the quick profile (single, dual, all; seed 0) with fp32 and with float16 adapters on the
    wire, the same runs otherwise: ROUGE-1 of every (scenario, evaluation, routing) record side by side."""
    from fedrouter.bench import read_records, run_bench

    runs = {}
    for dtype in ("float32", "float16"):
        path = run_bench(
            "quick",
            out=tmp / dtype,
            data_root=PAPER4.parent,
            runs_dir=tmp / dtype / "runs",
            methods=["fedrouter"],
            overrides={"train.adapter_dtype": dtype},
            log=lambda line, dtype=dtype: print(f"  {dtype}: {line}", file=sys.stderr, flush=True),
        )
        runs[dtype] = {(r["scenario"], r["eval_mode"], r["routing"]): r for r in read_records(path)}
    rows = [
        {
            "scenario": scenario,
            "eval_mode": eval_mode,
            "routing": routing,
            "rouge1_fp32": record["rouge1"],
            "rouge1_16bit": runs["float16"][(scenario, eval_mode, routing)]["rouge1"],
        }
        for (scenario, eval_mode, routing), record in sorted(runs["float32"].items())
    ]
    clients = PROFILES["quick"].settings["data.num_clients"]
    upload = {dtype: runs[dtype][min(runs[dtype])]["bytes_up_per_round"][0] / clients for dtype in runs}
    return {
        "quick_rouge1_fp32_adapters": statistics.mean(r["rouge1_fp32"] for r in rows),
        "quick_rouge1_16bit_adapters": statistics.mean(r["rouge1_16bit"] for r in rows),
        "quick_bytes_per_client_round": upload["float32"],
        "quick_bytes_per_client_round_16bit": upload["float16"],
        "quick_16bit_records": rows,
    }


def evaluation_phase(old_commit: str, tmp: Path) -> dict:
    """The evaluation phase of ``configs/paper4-raw-cpu.toml`` (scenario single, seed 0) under ``old_commit``'s
    code and under this tree's, one after the other on this machine: each a whole ``fedrouter run`` in a fresh
    process (the same training, so the same adapters to answer with), its ``src`` first on ``PYTHONPATH``."""
    old_tree = tmp / "old"
    old_tree.mkdir()
    archive = subprocess.run(["git", "archive", old_commit, "src"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(old_tree)], input=archive.stdout, check=True)
    runs = {}
    for name, src in (("old", old_tree / "src"), ("new", ROOT / "src")):
        print(f"running paper4-raw-cpu with the {name} code ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "fedrouter.cli", "run", "--quiet", "--config", "configs/paper4-raw-cpu.toml"]
        command += ["--output", str(tmp), "--name", name]
        started = time.perf_counter()
        env = os.environ | {"PYTHONPATH": str(src)}
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
        wall = time.perf_counter() - started
        metrics = json.loads((tmp / name / "metrics.json").read_text())
        runs[name] = {
            "wall_s": wall,
            "evaluation_s": metrics["evaluation_s"],
            "eval_tokens": metrics["eval_tokens"],
            "answers_crc32": metrics["answers_crc32"],
            "rouge1": {key: value["rouge1"] for key, value in metrics["evaluation"]["overall"].items()},
        }
    old, new = runs["old"], runs["new"]
    return {
        "evaluation_old_commit": old_commit,
        "evaluation_old_s": old["evaluation_s"],
        "evaluation_new_s": new["evaluation_s"],
        "evaluation_speedup": old["evaluation_s"] / new["evaluation_s"],
        "evaluation_clients_same_answers": sum(
            old["answers_crc32"][c] == new["answers_crc32"].get(c) for c in old["answers_crc32"]
        ),
        "evaluation_runs": runs,
    }


def cached_load_seconds() -> float:
    code = "import time; from fedrouter.model.loading import load_base_model as l; t=time.perf_counter(); l('smollm2'); print(time.perf_counter()-t)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    import tempfile

    if sys.argv[1:2] == ["--evaluation-phase"]:  # old commit and this tree side by side, nothing else
        with tempfile.TemporaryDirectory() as tmp:
            result = evaluation_phase(sys.argv[2], Path(tmp))
        result |= {"machine": machine(), "commit": commit(OUT.parent), "command": " ".join(["python", *sys.argv])}
        (OUT.parent / "speed-evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
        print({key: value for key, value in result.items() if key != "evaluation_runs"})
        return
    torch.manual_seed(0)
    base = loading.load_base_model("smollm2")
    train, test = load_source(Config({"data.source": str(PAPER4)}))
    long_samples = [s for s in train if s.task == "samsum"]  # dialogues: full 256-token sequences
    mixed = [s for i, s in enumerate(test) if i % 37 == 0]
    result: dict = {}
    for name, bench in (
        ("train step", lambda: bench_train_step(base, long_samples)),
        ("embedding", lambda: bench_embedding(base, long_samples)),
        ("generation", lambda: bench_generation(base, mixed)),
        ("round", lambda: bench_round(base)),
    ):
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        result.update(bench())
    result["cached_load_s"] = cached_load_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        print("measuring the reference setting (fp32 and fp16 adapters) ...", file=sys.stderr, flush=True)
        full = reference_setting(Path(tmp), "float32")
        half = reference_setting(Path(tmp), "float16")
        print("measuring float16 adapters on the quick profile ...", file=sys.stderr, flush=True)
        result.update(quick_16bit(Path(tmp)))
    result.update(
        {
            "model_loads_per_run": full["model_loads_per_run"],
            "bytes_per_client_round": full["bytes_per_client_round"],
            "bytes_per_client_round_16bit": half["bytes_per_client_round"],
            "rouge1_fp32_adapters": full["rouge1"],
            "rouge1_16bit_adapters": half["rouge1"],
            "peak_rss_mb_8_clients": full["peak_rss_mb"],
            "reference_setting_wall_s": full["wall_s"],
            "reference_setting_rouge1": full["rouge1"],
            "reference_setting": full,
            "reference_setting_16bit": half,
        }
    )
    result["machine"] = machine()
    result["commit"] = commit()
    result["command"] = "python benchmarks/speed.py"
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    for key in (
        "train_step_speedup",
        "first_step_loss_rel_diff",
        "embed_speedup",
        "generate_speedup",
        "round_speedup_vs_reference_style",
        "model_loads_per_run",
        "cached_load_s",
        "train_flops_fraction_of_peak",
        "bytes_per_client_round",
        "bytes_per_client_round_16bit",
        "rouge1_fp32_adapters",
        "rouge1_16bit_adapters",
        "quick_rouge1_fp32_adapters",
        "quick_rouge1_16bit_adapters",
        "peak_rss_mb_8_clients",
        "reference_setting_wall_s",
        "reference_setting_rouge1",
    ):
        print(f"{key}: {result[key]:.4g}" if isinstance(result[key], float) else f"{key}: {result[key]}")


if __name__ == "__main__":
    main()
