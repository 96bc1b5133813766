"""A method of one's own, defined here and nowhere in the product: registered, run end to end in simulation.

``LengthSplit`` groups a client's samples by input length (short and long), trains one shared adapter per
length group, and answers each test sample with the adapter of the length group its input falls in. It touches
every kind of hook (grouping on client and server, adapters and jobs, what the server sends for evaluation,
serving) and nothing else: the server and the clients run it through the hooks alone.
"""

from pathlib import Path

import numpy as np

from fedrouter.algorithm.clustering import cluster_means, nearest
from fedrouter.federated.records import check_array, get_arrays, to_record
from fedrouter.methods import ClientClusters, Grouping, Job, Method, register
from fedrouter.methods.registry import PLUGINS_ENV


@register
class LengthSplit(Method):
    name = "lengthsplit"
    title = "Length split (a test plugin)"
    embeds = True  # its "embedding" is one number per sample: the input's length in characters

    def group_samples(self, base, data) -> Grouping:
        lengths = np.array([[len(s.instruction)] for s in data.train], dtype=np.float32)
        labels = (lengths[:, 0] > np.median(lengths)).astype(np.int64)
        if labels.min() == labels.max():
            labels[:] = 0
        return Grouping(labels, lengths, cluster_means(lengths, labels).astype(np.float32))

    def local_k_limit(self, num_tasks: int) -> int:
        return 2

    def group_clusters(self, clients: list[ClientClusters]) -> tuple[np.ndarray, dict]:
        """Global cluster 0: local clusters shorter than the median centroid; 1: the others."""
        centroids = np.concatenate([c.centroids for c in clients])
        split = np.median(centroids[:, 0])
        for client in clients:
            client.assignment = (client.centroids[:, 0] > split).astype(np.int64)
        labels = np.concatenate([c.assignment for c in clients])
        if labels.min() == labels.max():
            labels[:] = 0
            for client in clients:
                client.assignment[:] = 0
        return cluster_means(centroids, labels).astype(np.float32), {}

    def shared_adapters(self, initial, num_global: int) -> dict:
        return {str(g): dict(initial) for g in range(num_global)}

    def jobs(self, round_index: int, client: ClientClusters) -> list[Job]:
        return [
            Job(name=f"len{local}", shared=str(int(g)), local_cluster=local)
            for local, g in enumerate(client.assignment)
        ]

    def serving_records(self, clients, centers, table, tasks) -> dict:
        return {c.client_id: {"lengths": to_record({"centers": centers})} for c in clients}

    def read_serving(self, content, keys, local, who) -> dict:
        centers = get_arrays(content, "lengths", who).get("centers")
        return {"centers": check_array(centers, f"{who} length centers", shape=(len(keys), 1))}

    def serve(self, serving, samples, modes) -> dict:
        lengths = np.array([[len(s.instruction)] for s in samples], dtype=np.float32)
        keys = [("shared", str(int(g))) for g in nearest(lengths, serving.extra["centers"])]
        return {mode: keys for mode in modes}


def test_a_method_defined_in_a_test_file_runs_end_to_end(tmp_path, monkeypatch):
    from conftest import tiny_settings

    from fedrouter.config import Config
    from fedrouter.simulation import run_experiment

    # The clients (Ray workers) load the plugin as any machine would: named in their own environment.
    monkeypatch.setenv(PLUGINS_ENV, str(Path(__file__).resolve()))
    cfg = Config(tiny_settings(tmp_path, **{"run.method": "lengthsplit", "eval.sets": "personalized,generalization"}))
    _, metrics = run_experiment(cfg, tmp_path / "run")
    assert metrics["method"] == "lengthsplit"
    assert metrics["clustering"]["global_k"] == 2
    assert all(k == 2 for k in metrics["clustering"]["local_k"].values())
    for record in metrics["rounds"]:
        assert record["updated_adapters"] == ["0", "1"]  # both length groups trained every round
        assert set(record["train_loss"]) == {"0", "1"}
    overall = metrics["evaluation"]["overall"]
    assert set(overall) == {"personalized/lengthsplit", "generalization/lengthsplit"}
    assert all(0 <= v["rouge1"] <= 100 for v in overall.values())
    assert metrics["evaluation"]["missing_clients"] == {}
