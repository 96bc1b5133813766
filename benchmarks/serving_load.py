"""Load test of `fedrouter serve` on loopback: throughput, latency and routing at 1, 4 and 16 concurrent clients.

    .venv/bin/python benchmarks/serving_load.py RUN_DIR [--data ../shared/data/paper4-raw] [--max-tokens 32]
        [--compare REV] [--precision auto]

RUN_DIR is a trained FedRouter run on that data. The script, side by side in one run:
1. loads the run in this process (the sequential baseline: one `Router.generate` call per prompt, greedily; it
   also gives each prompt's adapter) and starts `fedrouter serve RUN_DIR` on a free loopback port;
2. sends the prompts from 1 and 4 client threads (the official `openai` client), then, ``--rounds`` times, answers
   all 64 prompts sequentially and then sends them from 16 client threads; each level is bounded in requests and
   in time. Alternating the two gives each round's ratio from neighbouring minutes: this machine's speed drifts
   by a quarter from one few minutes to the next, which one baseline first and one server run later mistook
   for a change of the ratio (3.3x and 4.2x from the same code);
3. with ``--compare REV``, starts REV's `fedrouter serve` too (REV's ``src``, unpacked by ``git archive`` and put
   first on ``PYTHONPATH``, as ``serve_start.py`` does) and sends the same 16-client load to it in every round,
   the two servers' order alternating from round to round (only one is sent requests at a time): the ratio of
   this code's tokens per second to REV's, per round and their median;
4. before any load, sends the same prompt ten times, one after the other, to each freshly started server: the
   first request's latency against the tenth's (does the server answer its first request as fast as later ones);
5. stops the servers (their whole process groups) and writes benchmarks/results/serving.json: requests and tokens
   per second, p50/p99 latency, routing accuracy against the prompts' true tasks, requests lost, requests answered
   by another adapter than `Router.generate` gives the same prompt, and the throughput ratio of 16 clients to the
   sequential baseline in each round, with their median.

The baseline and the server never run at the same time (the server is idle while the baseline runs). The record
says what else was running when it was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
from serve_start import older_source

from fedrouter.bench import commit, machine
from fedrouter.deploy import free_port
from fedrouter.serving.router import Router

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "serving.json"
LEVELS = {1: 8, 4: 32, 16: 64}  # concurrent clients: requests sent
LEVEL_LIMIT_S = 600


def prompts(path: Path, count: int) -> list[dict]:
    """``count`` test samples, the tasks taken in turn."""
    by_task: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        by_task.setdefault(sample["task"], []).append(sample)
    tasks = sorted(by_task)
    return [by_task[tasks[i % len(tasks)]][i // len(tasks)] for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_server(
    run_dir: Path, log: Path, source: Path | None = None, precision: str | None = None
) -> tuple[subprocess.Popen, str]:
    """`fedrouter serve RUN_DIR` on a free loopback port, from ``source`` (a ``src`` folder) or this checkout."""
    port = free_port()
    command = [sys.executable, "-m", "fedrouter.cli", "serve", str(run_dir), "--port", str(port), "--max-batch", "16"]
    command += ["--precision", precision] if precision else []
    env = os.environ if source is None else {**os.environ, "PYTHONPATH": str(source)}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def load_level(url: str, samples: list[dict], clients: int, max_tokens: int) -> tuple[list[dict], float]:
    """Send every sample from ``clients`` threads; one result per sample (None fields when lost)."""
    results: list[dict | None] = [None] * len(samples)
    next_index = iter(range(len(samples)))
    lock = threading.Lock()
    deadline = time.monotonic() + LEVEL_LIMIT_S

    def worker() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=LEVEL_LIMIT_S)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            started = time.perf_counter()
            try:
                response = client.chat.completions.create(
                    model="fedrouter",
                    messages=[{"role": "user", "content": samples[i]["instruction"]}],
                    max_tokens=max_tokens,
                )
            except openai.OpenAIError as err:
                results[i] = {"error": str(err)}
                continue
            results[i] = {
                "latency_s": time.perf_counter() - started,
                "adapter": response.model_extra["fedrouter"]["adapter"],
                "tokens": response.usage.completion_tokens,
                "text": response.choices[0].message.content,
            }

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r or {"error": "not sent in time"} for r in results], time.perf_counter() - started


def first_and_tenth(url: str, sample: dict, max_tokens: int) -> dict:
    """One prompt sent ten times, one after the other, to a server that has answered nothing yet."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=LEVEL_LIMIT_S)
    latencies = []
    for _ in range(10):
        started = time.perf_counter()
        client.chat.completions.create(
            model="fedrouter", messages=[{"role": "user", "content": sample["instruction"]}], max_tokens=max_tokens
        )
        latencies.append(time.perf_counter() - started)
    return {
        "first_s": round(latencies[0], 3),
        "tenth_s": round(latencies[9], 3),
        "first_over_tenth": round(latencies[0] / latencies[9], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper4-raw")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="sequential / 16-client rounds, alternated")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument("--compare", metavar="REV", help="an older commit whose server takes the same load")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="instead of the run's recorded one")
    args = parser.parse_args()

    metrics = json.loads((args.run_dir / "metrics.json").read_text())
    majority = {
        f"cluster_{g}": Counter(tasks).most_common(1)[0][0]
        for g, tasks in metrics["clustering"]["global_cluster_tasks"].items()
    }
    samples = prompts(args.data / "test.jsonl", max(LEVELS.values()))

    router = Router.load(args.run_dir, precision=args.precision)
    router.generate([samples[0]["instruction"]], max_new_tokens=2)  # warm-up: adapters loaded, first call paid

    def sequential() -> tuple[list, dict]:
        """The baseline: one Router.generate call per prompt."""
        answers, started = [], time.perf_counter()
        for sample in samples:
            answers.append(router.generate([sample["instruction"]], max_new_tokens=args.max_tokens)[0])
        wall = time.perf_counter() - started
        return answers, {
            "requests": len(samples),
            "wall_s": round(wall, 2),
            "requests_per_s": round(len(samples) / wall, 3),
            "tokens_per_s": round(sum(a.completion_tokens for a in answers) / wall, 2),
        }

    def level(url: str, clients: int, count: int) -> dict:
        results, wall = load_level(url, samples[:count], clients, args.max_tokens)
        done = [(i, r) for i, r in enumerate(results) if "error" not in r]
        latencies = [r["latency_s"] for _, r in done]
        figures = {
            "requests": count,
            "answered": len(done),
            "lost": count - len(done),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3],
            "wall_s": round(wall, 2),
            "requests_per_s": round(len(done) / wall, 3),
            "tokens_per_s": round(sum(r["tokens"] for _, r in done) / wall, 2),
            "latency_p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
            "latency_p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
            "routing_accuracy": round(
                sum(majority.get(r["adapter"]) == samples[i]["task"] for i, r in done) / count, 4
            ),
            "other_adapter_than_router_generate": sum(r["adapter"] != expected[i] for i, r in done),
            "same_text_as_router_generate": round(
                sum(r["text"] == baseline[i].text for i, r in done) / max(len(done), 1), 4
            ),
        }
        print(f"{clients:2d} clients: {json.dumps(figures)}", flush=True)
        return figures

    baseline, first = sequential()
    expected = [f"cluster_{a.adapter}" for a in baseline]
    levels, rounds, starts = {}, [], {}
    scratch = Path(tempfile.mkdtemp(prefix="fedrouter-load-"))
    servers = {"this": start_server(args.run_dir, scratch / "server.log", precision=args.precision)}
    if args.compare:
        source = older_source(args.compare, scratch / "older")
        servers[args.compare] = start_server(args.run_dir, scratch / "older-server.log", source, args.precision)
    try:
        for name, (_, address) in servers.items():
            starts[name] = first_and_tenth(address, samples[0], args.max_tokens)
            print(f"{name}: first and tenth request {json.dumps(starts[name])}", flush=True)
        for clients in (1, 4):
            levels[str(clients)] = level(servers["this"][1], clients, LEVELS[clients])
        for r in range(args.rounds):
            alone = first if r == 0 else sequential()[1]
            served, older = {}, {}
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                (served if name == "this" else older)[name] = level(servers[name][1], 16, LEVELS[16])
            served = served["this"]
            rounds.append(
                {
                    "sequential_router_generate": alone,
                    "server_16_clients": served,
                    "ratio": round(served["requests_per_s"] / alone["requests_per_s"], 2),
                }
            )
            if args.compare:
                then = older[args.compare]
                rounds[-1] |= {
                    "compared_server_16_clients": then,
                    "tokens_per_s_over_compared": round(served["tokens_per_s"] / then["tokens_per_s"], 2),
                }
            print(f"round {r}: {json.dumps({k: v for k, v in rounds[-1].items() if 'ratio' in k or 'over' in k})}")
        health = httpx.get(f"{servers['this'][1]}/health", timeout=5).json()
    finally:
        for process, _ in servers.values():
            stop_server(process)

    ratios = sorted(r["ratio"] for r in rounds)
    record = {
        "command": (
            f"python benchmarks/serving_load.py {args.run_dir} --data {args.data} --max-tokens {args.max_tokens} "
            f"--rounds {args.rounds}"
            + (f" --compare {args.compare}" if args.compare else "")
            + (f" --precision {args.precision}" if args.precision else "")
        ),
        "commit": commit(OUT.parent),  # other results written there are no change of the code
        "machine": machine(),
        "note": args.note,
        "run": str(args.run_dir),
        "max_tokens": args.max_tokens,
        "precision": args.precision or "as recorded",
        "baseline_routing_accuracy": round(
            sum(majority.get(e) == s["task"] for e, s in zip(expected, samples, strict=True)) / len(samples), 4
        ),
        "compared_commit": args.compare,
        "first_and_tenth_request": starts,
        "server": levels,
        "rounds": rounds,
        "server_steps": health["steps"],
        "throughput_ratio_16_clients_vs_sequential": {
            "median": ratios[len(ratios) // 2],
            "min": ratios[0],
            "max": ratios[-1],
        },
    }
    if args.compare:
        gains = sorted(r["tokens_per_s_over_compared"] for r in rounds)
        record["tokens_per_s_16_clients_over_compared"] = {"median": gains[len(gains) // 2], "min": gains[0]}
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["throughput_ratio_16_clients_vs_sequential"]))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
