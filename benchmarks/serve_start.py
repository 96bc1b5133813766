"""How soon `fedrouter serve` answers after it starts: its first and tenth request, this code and an older commit.

    .venv/bin/python benchmarks/serve_start.py [--run RUN_DIR] [--compare HEAD] [--rounds 3] [--requests 10]

For each version (this checkout's ``src``, and with ``--compare REV`` that commit's ``src``, unpacked by
``git archive`` into a temporary folder and put first on ``PYTHONPATH``), ``--rounds`` times, one after the other:
starts `fedrouter serve RUN_DIR` on a free loopback port, polls ``/health`` every 20 ms until it answers 200 (as a
load balancer would), then sends ``--requests`` chat requests one after the other (greedy, 16 tokens, the
prompts taken in turn) and stops the server's process group. Without ``--run`` the router is the tests' tiny
one (``tests/conftest.py``'s ``write_tiny_router``: the two-layer random model, whose reference scales are never
cached on disk, so every start computes them, as a real model's first start does).

Writes benchmarks/results/serve_start.json (and its table, serve_start.md): for each start the seconds from the process's start to its port
answering and to ``/health`` saying 200, each request's latency, and the first and tenth; per version the
medians over rounds, the median of every later request (2 to 10) and the ratios of the first to both; the command, commit, CPU (``lscpu``'s model name) and the load
average when it began (other work on this machine slows every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import ANCHORS, write_tiny_router  # noqa: E402 (the tests' tiny router, built the same way)

from fedrouter.bench import commit  # noqa: E402
from fedrouter.deploy import free_port  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve_start.json"
COLUMNS = {
    "port_open_s": "port answers, s",
    "health_200_s": "/health 200, s",
    "first_request_s": "1st request, s",
    "tenth_request_s": "10th request, s",
    "later_requests_s": "requests 2-10, s",
    "first_over_tenth": "1st / 10th",
}
START_LIMIT_S = 600


def cpu_name() -> str:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "unknown")


def older_source(rev: str, into: Path) -> Path:
    """``rev``'s ``src`` folder, unpacked under ``into`` (the checkout and its git state are left alone)."""
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def one_start(run_dir: Path, source: Path, requests: int, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(source), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "fedrouter.cli", "serve", str(run_dir), "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    port_open = None
    try:
        while True:
            if process.poll() is not None or time.perf_counter() - started > START_LIMIT_S:
                raise RuntimeError(f"the server did not get ready: {log.read_text()[-2000:]}")
            try:
                health = httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            port_open = port_open or time.perf_counter() - started
            if health.status_code == 200:
                break
            time.sleep(0.02)
        ready = time.perf_counter() - started
        latencies = []
        for i in range(requests):
            body = {
                "model": "fedrouter",
                "messages": [{"role": "user", "content": ANCHORS[i % len(ANCHORS)]}],
                "max_tokens": 16,
            }
            sent = time.perf_counter()
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=START_LIMIT_S)
            answer.raise_for_status()
            latencies.append(round(time.perf_counter() - sent, 3))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return {
        "port_open_s": round(port_open, 3),
        "health_200_s": round(ready, 3),
        "first_request_s": latencies[0],
        "tenth_request_s": latencies[min(9, len(latencies) - 1)],
        "latencies_s": latencies,
        "health_200_says": health.json().get("status"),
    }


def summary(starts: list[dict]) -> dict:
    keys = [key for key, value in starts[0].items() if isinstance(value, float)]
    median = {key: round(statistics.median(s[key] for s in starts), 3) for key in keys}
    # The tenth alone is one sample of a noisy host: the median of every later request says the same, steadier.
    median["later_requests_s"] = round(statistics.median(x for s in starts for x in s["latencies_s"][1:]), 3)
    median["first_over_tenth"] = round(median["first_request_s"] / median["tenth_request_s"], 2)
    median["first_over_later"] = round(median["first_request_s"] / median["later_requests_s"], 2)
    return median


def table(result: dict) -> str:
    """The medians of each version, one row each (the record's ``versions``)."""
    lines = [
        "# fedrouter serve: from start to its first and tenth answer\n",
        f"Router: {result['router']}; {result['requests']}; medians over the rounds.\n",
        "| version | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, version in result["versions"].items():
        lines.append(f"| {name} | " + " | ".join(f"{version['median'][key]:g}" for key in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run folder (holds router/); default: the tests' tiny router")
    parser.add_argument("--compare", metavar="REV", help="also measure this commit's src, side by side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    load, measured = os.getloadavg(), commit(args.out.parent)  # before: others may commit while it runs
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_dir = args.run
        if run_dir is None:
            from fedrouter.model.loading import load_base_model

            (work / "tiny").mkdir()
            run_dir = write_tiny_router(work / "tiny", load_base_model("tiny-random", precision="fp32"))
        versions = {"this checkout": ROOT / "src"}
        if args.compare:
            rev = subprocess.run(
                ["git", "rev-parse", "--short", args.compare], cwd=ROOT, capture_output=True, text=True
            )
            versions[f"commit {rev.stdout.strip()}"] = older_source(args.compare, work / "older")
        starts: dict[str, list[dict]] = {name: [] for name in versions}
        for r in range(args.rounds):  # the versions alternate, so a drift of the machine's speed hits both
            for name, source in versions.items():
                record = one_start(run_dir, source, args.requests, work / "serve.log")
                starts[name].append(record)
                print(f"round {r} {name}: {json.dumps(record)}", flush=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": measured,
        "machine": f"{cpu_name()} (lscpu), {os.cpu_count()} cores",
        "note": f"load average {load[0]:.1f} when it began: other work shared the cores and slows every figure",
        "router": str(args.run) if args.run else "tests' tiny router (tiny-random, 3 adapters)",
        "requests": f"{args.requests} chat requests one after the other, max_tokens 16, greedy",
        "versions": {name: {"median": summary(s), "starts": s} for name, s in starts.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(result))
    print(json.dumps({name: v["median"] for name, v in result["versions"].items()}, indent=2))


if __name__ == "__main__":
    main()
