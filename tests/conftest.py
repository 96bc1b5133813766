"""Shared fixtures: paths, the tiny random model, small configs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base():
    """The two-layer random Llama with the SmolLM2 tokenizer (built from a config, no download)."""
    from fedrouter.model.loading import load_base_model

    return load_base_model("tiny-random", precision="fp32")


def tiny_settings(tmp_path: Path, **extra) -> dict:
    settings = {
        "model.name": "tiny-random",
        "data.num_clients": 3,
        "data.scenario": "dual",
        "data.train_per_client": 16,
        "data.test_per_task": 2,
        "run.rounds": 2,
        "run.output_dir": str(tmp_path),
        "train.local_steps": 2,
        "train.batch_size": 4,
        "eval.max_new_tokens": 4,
        "cluster.global_k": "4",
    }
    settings.update(extra)
    return settings


@pytest.fixture
def in_a_flower_task(monkeypatch):
    """Flower builds messages only inside a run: give this process the identity a ClientApp would have."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


# Three prompts of clearly different kinds: the tiny router's global centroids are their embeddings.
ANCHORS = (
    "Sort these words in alphabetical order: pear, fig, apple, kiwi",
    "What is 12 plus 30? Answer with a number.",
    "Review: The lamp is awful and broke in a day. Is this review positive or negative?",
)


def write_tiny_router(run_dir: Path, base) -> Path:
    """A router artifact for the tiny random model: three clusters centred on ANCHORS, two clients, and random
    adapters large enough that each cluster answers differently. No training: seconds to build."""
    import numpy as np

    from fedrouter import discovery
    from fedrouter.model import LoraSettings, lora
    from fedrouter.serving.artifact import RouterArtifact

    space = discovery.embedding_space(base, discovery.EmbeddingSettings())
    centroids = space.embed(base, list(ANCHORS))
    rng = np.random.default_rng(0)
    adapters = {
        g: {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in lora.adapter_shapes(base).items()} for g in range(3)
    }
    config = base.lora
    RouterArtifact(
        base_model=base.name,
        model_name="tiny-random",
        lora=LoraSettings(config.r, config.lora_alpha, config.lora_dropout, tuple(sorted(config.target_modules))),
        global_centroids=centroids,
        local_centroids={0: centroids[[0, 1]], 1: centroids[[2]]},
        cluster_map={0: [0, 1], 1: [2]},
        adapters=adapters,
        precision="fp32",
        embedding=discovery.EmbeddingSettings(),
    ).save(run_dir)
    return run_dir


class Server:
    """`fedrouter serve RUN_DIR` as its own process group on a free loopback port, ready when /health answers."""

    def __init__(self, run_dir: Path, log: Path, *extra: str) -> None:
        import httpx

        from fedrouter.deploy import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fedrouter.cli", "serve", str(run_dir), "--port", str(self.port), *extra],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not answer in 120 s: {log.read_text()}")

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# Debian's chromium and chromedriver, driven by selenium: the pages people read, rendered as they see them.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
NO_BROWSER = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"


def require_browser(*, allow_module_level: bool = False) -> None:
    """Skip without a browser, unless FEDROUTER_REQUIRE_BROWSER says it must be there (CI)."""
    if CHROMIUM and CHROMEDRIVER:
        return
    if os.environ.get("FEDROUTER_REQUIRE_BROWSER"):
        raise RuntimeError("FEDROUTER_REQUIRE_BROWSER is set but chromium or chromedriver is missing")
    pytest.skip(NO_BROWSER, allow_module_level=allow_module_level)


def headless_browser(width: int = 1100, height: int = 800):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
