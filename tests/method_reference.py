"""Every method run end to end on the tiny model with a fixed seed: the reference the methods' redesign keeps.

``python tests/method_reference.py`` (re)writes ``tests/reference/<method>.json`` (the run's metrics without
timings) and ``<method>.safetensors`` (the server's shared adapters after the last round). Write them only from a
commit whose behaviour is the one to keep; ``test_reference.py`` checks that every method still gives them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

REFERENCE = Path(__file__).resolve().parent / "reference"
METHOD_NAMES = ("fedrouter", "oracle", "local", "fedit", "feddpa", "fedsa", "zeroshot")
# Figures that measure time or processes, not behaviour.
VOLATILE = ("seconds", "wall_s", "elapsed_s", "evaluation_s", "model_loads_per_process", "eval_model_loads_per_process")


def settings(method: str, output_dir: Path) -> dict:
    return {
        "run.method": method,
        "model.name": "tiny-random",
        "model.precision": "fp32",  # "auto" would pick bf16 on some CPUs and fp32 on others
        "data.num_clients": 3,
        "data.scenario": "dual",
        "data.train_per_client": 16,
        "data.test_per_task": 2,
        "run.rounds": 2,
        "run.seed": 7,
        "run.output_dir": str(output_dir),
        "train.local_steps": 2,
        "train.batch_size": 4,
        "train.lr": 0.2,  # large: after two steps the adapters move the random model's answers off the empty string
        "eval.max_new_tokens": 4,
        "eval.sets": "personalized,generalization",
    }


def behaviour(metrics: dict) -> dict:
    """The metrics without the figures that measure time or processes."""
    if isinstance(metrics, dict):
        return {
            key: behaviour(value)
            for key, value in metrics.items()
            if key not in VOLATILE and not key.endswith("_s") and not key.startswith("phases")
        }
    if isinstance(metrics, list):
        return [behaviour(value) for value in metrics]
    return metrics


def run(method: str, folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """One method's run: its metrics (without timings) and its shared adapters, keyed ``<adapter>/<weight>``."""
    from fedrouter.config import Config
    from fedrouter.federated.checkpoint import load_checkpoint
    from fedrouter.simulation import run_experiment

    run_dir, metrics = run_experiment(Config(settings(method, folder)), folder / method)
    del metrics["config"]["run.output_dir"]  # a temporary folder
    state, _ = load_checkpoint(run_dir)
    adapters = {f"{key}/{name}": value for key, arrays in state.shared.items() for name, value in arrays.items()}
    return behaviour(json.loads(json.dumps(metrics))), adapters


def platform() -> dict:
    """What decides the last bits of a float32 run: the torch build and the CPU kernels it picks."""
    import torch

    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def load(method: str) -> tuple[dict, dict[str, np.ndarray]]:
    adapters = REFERENCE / f"{method}.safetensors"
    return json.loads((REFERENCE / f"{method}.json").read_text()), load_file(adapters) if adapters.exists() else {}


def main(methods: list[str]) -> None:
    REFERENCE.mkdir(exist_ok=True)
    (REFERENCE / "platform.json").write_text(json.dumps(platform()) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            metrics, adapters = run(method, Path(tmp))
            (REFERENCE / f"{method}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
            if adapters:
                save_file(adapters, REFERENCE / f"{method}.safetensors")
            print(method, "written")


if __name__ == "__main__":
    main(sys.argv[1:] or list(METHOD_NAMES))
