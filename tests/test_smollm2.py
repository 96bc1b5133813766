"""The real embedded model: the on-disk cache, and one end-to-end run on a few samples."""

import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_settings

from fedrouter import Router
from fedrouter.config import Config
from fedrouter.simulation import run_experiment

pytestmark = pytest.mark.slow


def test_gguf_is_dequantized_once_then_loaded_from_the_cache(tmp_path):
    # Fresh processes with an empty cache folder: the first start converts the GGUF file, the second reads
    # safetensors. Compared as a ratio in one run, not as absolute times.
    code = (
        "import time; from fedrouter.model import loading as l; t = time.perf_counter(); "
        "l.load_base_model('smollm2'); print(time.perf_counter() - t, l.LOAD_COUNT)"
    )
    env = {"FEDROUTER_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    first, second = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        for _ in range(2)
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    first_s, loads = first.stdout.split()
    second_s, _ = second.stdout.split()
    assert loads == "1"
    assert float(second_s) * 3 < float(first_s), (first_s, second_s)
    assert list((tmp_path / "cache" / "models").glob("*/model.safetensors"))


def test_real_model_end_to_end_on_a_few_samples(tmp_path):
    cfg = Config(
        tiny_settings(
            tmp_path,
            **{
                "model.name": "smollm2",
                "data.num_clients": 4,
                "data.scenario": "dual",
                "data.train_per_client": 12,
                "data.test_per_task": 2,
                "run.rounds": 1,
                "cluster.global_k": "auto",
            },
        )
    )
    started = time.perf_counter()
    run_dir, metrics = run_experiment(cfg, tmp_path / "smol")
    clustering = metrics["clustering"]
    # Four clients, each holding two of the four generated tasks: the real embeddings separate them.
    assert clustering["local_k"] == {"0": 2, "1": 2, "2": 2, "3": 2}
    assert clustering["global_k"] == 4
    assert clustering["cluster_acc_local"] == 1.0 and clustering["cluster_acc_global"] == 1.0
    assert metrics["evaluation"]["overall"]["personalized/local"]["routing_acc"] == 1.0
    assert metrics["evaluation"]["overall"]["personalized/local"]["rouge1"] > 5
    router = Router.load(run_dir)
    answers = router.generate(
        ["Review: The lamp is awful. Avoid it.\nIs this review positive or negative?"], mode="local", client=0
    )
    assert answers[0].text.strip() and answers[0].adapter in router.artifact.cluster_map[0]
    assert time.perf_counter() - started < 600


@pytest.mark.skipif(not (SHARED_DATA / "flan16").is_dir(), reason="needs ../shared/data/flan16")
def test_refinement_finds_the_flan16_tasks_that_clients_alone_keep_together():
    # flan16-dual as the benchmark deals it (16 clients, two FLAN tasks each, 48 samples), embedded by the real
    # model: some clients' two tasks look alike to their own silhouette search; the global centroids of the
    # other clients holding those tasks tell them apart.
    from fedrouter import bench, discovery
    from fedrouter.algorithm.metrics import clustering_accuracy, contingency
    from fedrouter.data import all_clients
    from fedrouter.model.loading import base_model

    settings = bench.run_settings(bench.PROFILES[bench.STANDARD], bench.MANY_TASK, "fedrouter", 0, SHARED_DATA)
    cfg = Config(settings | {"model.precision": "auto"})
    clients = all_clients(cfg)
    base = base_model(cfg)
    embeddings = [discovery.embed(base, cfg, [s.instruction for s in c.train]) for c in clients]
    truth = [s.task for c in clients for s in c.train]
    tasks = sorted(set(truth))

    def accuracy(found: discovery.Discovery) -> float:
        clusters = np.concatenate([found.sample_clusters(i) for i in range(len(clients))])
        return clustering_accuracy(contingency(clusters, truth, found.global_fit.n_clusters_, tasks))

    once = discovery.discover(Config(settings | {"cluster.refine_rounds": 0}), embeddings)
    refined = discovery.discover(cfg, embeddings)
    assert refined.local_k_first == [int(lab.max()) + 1 for lab in once.local_labels]
    split = [i for i, lab in enumerate(refined.local_labels) if lab.max() > once.local_labels[i].max()]
    assert split, "no client's local clusters were refined"
    assert accuracy(refined) > accuracy(once) and accuracy(refined) >= 0.95
    assert abs(refined.global_fit.n_clusters_ - 16) <= 2
