"""Pure algorithm code on NumPy arrays: clustering, aggregation, routing, scheduling, metrics."""

import numpy as np
import pytest

from fedrouter.algorithm.aggregation import aggregate_clusters, weighted_average
from fedrouter.algorithm.clustering import (
    ClusteringError,
    ThresholdAgglomerative,
    centred_local_clusters,
    global_clusters,
    local_clusters,
    refine_local_clusters,
)
from fedrouter.algorithm.metrics import clustering_accuracy, contingency, exact_match, rouge, routing_accuracy
from fedrouter.algorithm.routing import cluster_radii, fall_back, route
from fedrouter.algorithm.scheduling import balanced_offsets, learning_rate, scheduled_clusters


def blobs(k: int, per: int = 20, dim: int = 16, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 5
    points = np.concatenate([c + spread * rng.normal(size=(per, dim)) for c in centers])
    return points, np.repeat(np.arange(k), per)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_silhouette_finds_the_number_of_separable_groups(k):
    points, truth = blobs(k)
    fitted = local_clusters(points, k="auto", k_max=6, threshold=0.1, seed=0)
    assert fitted.n_clusters_ == k
    table = contingency(fitted.labels_, [str(t) for t in truth], k, [str(i) for i in range(k)])
    assert clustering_accuracy(table) == 1.0
    assert max(fitted.scores_, key=fitted.scores_.get) == k


def test_one_blob_gives_k_equals_one():
    points, _ = blobs(1, per=40)
    fitted = local_clusters(points, k="auto", k_max=6, threshold=0.3, seed=0)
    assert fitted.n_clusters_ == 1
    assert (fitted.labels_ == 0).all()
    np.testing.assert_allclose(fitted.centers_[0], points.mean(0))


def test_fixed_k_and_too_few_samples():
    points, _ = blobs(2, per=5)
    assert local_clusters(points, k=2, k_max=6, threshold=0.1, seed=0).n_clusters_ == 2
    with pytest.raises(ClusteringError, match="3 point.*cannot form 5 clusters.*fewer samples than clusters"):
        local_clusters(points[:3], k=5, k_max=6, threshold=0.1, seed=0, what="client 0's samples")
    with pytest.raises(ClusteringError, match="NaN"):
        local_clusters(np.full((4, 2), np.nan), k="auto", k_max=3, threshold=0.1, seed=0)


def test_global_clustering_groups_clients_by_task():
    # Eight clients' centroids: two clients per task, slightly different.
    centers, task = blobs(4, per=2, spread=0.05, seed=3)
    fitted = global_clusters(centers, np.full(8, 24), k="auto", k_max=7, threshold=0.1, seed=0)
    assert fitted.n_clusters_ == 4
    for t in range(4):
        assert len(set(fitted.labels_[task == t])) == 1


def test_cosine_global_clustering_sees_tasks_that_one_far_task_hides():
    # Three tasks, two clients each: tasks 0 and 1 point in different directions at length 1, task 2 lies far
    # away (length 100). Euclidean silhouette prefers k=2 (task 2 against the rest, as flan16's word_segment
    # did); on directions the three tasks are three clusters.
    rng = np.random.default_rng(0)
    axes = np.eye(3)[:, None, :] * np.array([1.0, 1.0, 100.0])[:, None, None]
    centroids = np.concatenate([a + 0.02 * rng.normal(size=(2, 3)) for a in axes])
    counts = np.array([10, 30, 10, 30, 10, 30])
    euclidean = global_clusters(centroids, counts, k="auto", k_max=4, threshold=0.2, seed=0, metric="euclidean")
    cosine = global_clusters(centroids, counts, k="auto", k_max=4, threshold=0.2, seed=0)  # the default
    assert euclidean.n_clusters_ == 2
    assert cosine.n_clusters_ == 3 and len(set(cosine.labels_[[0, 2, 4]])) == 3
    for g in range(3):  # each global centroid is its members' count-weighted mean, at their own length
        members = cosine.labels_ == g
        np.testing.assert_allclose(cosine.centers_[g], np.average(centroids[members], axis=0, weights=counts[members]))
    assert np.array_equal(cosine.predict(centroids), cosine.labels_)
    with pytest.raises(ClusteringError, match="zero vector"):
        global_clusters(np.vstack([centroids, np.zeros(3)]), np.ones(7), k="auto", k_max=4, threshold=0.2, seed=0,
                        metric="cosine")  # fmt: skip
    with pytest.raises(ClusteringError, match="NaN"):
        global_clusters(np.full((3, 2), np.nan), np.ones(3), k=2, k_max=2, threshold=0.2, seed=0, metric="cosine")


def test_clustering_accuracy_uses_best_one_to_one_matching():
    # Cluster ids are arbitrary; a swapped labelling is still perfect; a merged cluster is not.
    assert clustering_accuracy(np.array([[0, 10], [10, 0]])) == 1.0
    assert clustering_accuracy(np.array([[10, 10], [0, 0]])) == 0.5
    assert clustering_accuracy(np.array([[10, 0], [0, 5], [0, 5]])) == pytest.approx(15 / 20)


def test_weighted_average_by_local_cluster_counts():
    a = {"w": np.array([0.0, 0.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    np.testing.assert_allclose(weighted_average([(a, 2), (b, 1)])["w"], [1.0, 2.0])
    adapters = {
        0: {"w": np.zeros(2, np.float32)},
        1: {"w": np.ones(2, np.float32)},
        2: {"w": np.full(2, 7, np.float32)},
    }
    new, weights = aggregate_clusters(adapters, [(0, a, 30), (0, b, 10), (1, b, 5)])
    np.testing.assert_allclose(new[0]["w"], [0.75, 1.5])  # 10/40 of b
    np.testing.assert_allclose(new[1]["w"], b["w"])
    np.testing.assert_array_equal(new[2]["w"], adapters[2]["w"])  # no update: keeps its adapter
    assert weights == {0: 40.0, 1: 5.0}
    with pytest.raises(KeyError):
        aggregate_clusters(adapters, [(9, a, 1)])
    with pytest.raises(ValueError):
        weighted_average([(a, 0)])


def test_routing_local_and_global_modes():
    global_centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    # The client holds two local clusters, mapped to global clusters 2 and 0.
    local_centroids = np.array([[0.0, 9.0], [1.0, 1.0]])
    samples = np.array([[0.5, 9.5], [9.0, 1.0], [0.2, 0.1]])
    np.testing.assert_array_equal(route(samples, mode="global", global_centroids=global_centroids), [2, 1, 0])
    # Local mode never leaves the client's own clusters: the sample near global cluster 1 goes to the client's
    # nearest local cluster (1 -> global 0).
    local = route(
        samples,
        mode="local",
        global_centroids=global_centroids,
        local_centroids=local_centroids,
        local_to_global=[2, 0],
    )
    np.testing.assert_array_equal(local, [2, 0, 0])
    with pytest.raises(ValueError, match="local routing needs"):
        route(samples, mode="local", global_centroids=global_centroids)
    with pytest.raises(ValueError, match="unknown routing mode"):
        route(samples, mode="nearest", global_centroids=global_centroids)


def test_cluster_radii_equal_the_rms_distance_of_the_samples_to_their_global_centroid():
    # Two clients' samples, grouped locally; the radii from centroids, counts and spreads alone (what the server
    # holds) equal the RMS distance computed from the samples themselves.
    rng = np.random.default_rng(0)
    samples = [rng.normal(size=(30, 5)) + 4 * np.eye(5)[0], rng.normal(size=(12, 5)) * 2, rng.normal(size=(20, 5))]
    clients = [[samples[0][:18], samples[1]], [samples[0][18:], samples[2]]]  # global clusters: 0, 1; 0, 1
    groups = [np.array([0, 1]), np.array([0, 1])]
    members = {0: np.concatenate([clients[0][0], clients[1][0]]), 1: np.concatenate([clients[0][1], clients[1][1]])}
    centers = np.stack([members[g].mean(0) for g in (0, 1)])
    radii = cluster_radii(
        centers,
        [np.stack([x.mean(0) for x in c]) for c in clients],
        [np.array([len(x) for x in c]) for c in clients],
        [np.array([np.sqrt(((x - x.mean(0)) ** 2).sum(1).mean()) for x in c]) for c in clients],
        groups,
    )
    expected = [np.sqrt(((members[g] - centers[g]) ** 2).sum(1).mean()) for g in (0, 1)]
    np.testing.assert_allclose(radii, expected, rtol=1e-10)
    # A global cluster no local cluster joined gets the largest radius of the others.
    one_member = cluster_radii(centers, [centers[:1]], [np.array([3])], [np.array([1.0])], [np.array([0])])
    np.testing.assert_allclose(one_member, [1.0, 1.0])


def test_fall_back_past_factor_times_the_radius_of_the_chosen_cluster():
    centers = np.array([[0.0, 0.0], [10.0, 0.0]])
    radii = np.array([1.0, 3.0])
    points = np.array([[1.4, 0.0], [1.6, 0.0], [10.0, 4.4], [10.0, 4.6]])
    routed = route(points, mode="global", global_centroids=centers)
    np.testing.assert_array_equal(fall_back(points, routed, centers, radii, 1.5), [False, True, False, True])
    np.testing.assert_array_equal(fall_back(points, routed, centers, radii, 2.0), [False, False, False, False])


def _updates(assignments, offsets, rounds):
    """(round, global cluster) -> how many clients train it, under round-robin with these offsets."""
    counts = np.zeros((rounds, 1 + max(max(a) for a in assignments)), dtype=int)
    for clusters, offset in zip(assignments, offsets, strict=True):
        for r in range(rounds):
            counts[r, clusters[scheduled_clusters("round-robin", len(clusters), r, offset)[0]]] += 1
    return counts


def test_balanced_offsets_give_every_global_cluster_updates_in_every_round():
    # dual: client c holds tasks c and c+1 of 4 (local clusters in task order; global ids as a real run drew them).
    dual = [[2, 3], [3, 1], [1, 0], [0, 2]] * 2
    by_client_id = _updates(dual, list(range(8)), 3)  # the old choice: half the adapters idle in every round
    assert (by_client_id == 0).sum(axis=1).tolist() == [2, 2, 2]
    assert sorted(by_client_id.sum(axis=0)) == [4, 4, 8, 8]
    balanced = _updates(dual, balanced_offsets(dual, 3), 3)
    assert balanced.tolist() == [[2, 2, 2, 2]] * 3
    # all: every client holds the 4 tasks in the same order; offsets spread them, 2 clients per task per round.
    same_order = [[0, 1, 2, 3]] * 8
    assert _updates(same_order, balanced_offsets(same_order, 3), 3).tolist() == [[2, 2, 2, 2]] * 3
    # Random layouts of 2-4 clusters per client: never less even than starting at the client id, and far fewer
    # (round, cluster) pairs without an update (coordinate descent finds a good plan, not always the best).
    rng = np.random.default_rng(0)
    idle = {"balanced": 0, "client id": 0}
    for _ in range(20):
        layout = [list(rng.permutation(5)[: rng.integers(2, 5)]) for _ in range(10)]
        new, old = _updates(layout, balanced_offsets(layout, 3), 3), _updates(layout, list(range(10)), 3)
        assert (new**2).sum() + (new.sum(0) ** 2).sum() <= (old**2).sum() + (old.sum(0) ** 2).sum()
        idle["balanced"] += int((new == 0).sum())
        idle["client id"] += int((old == 0).sum())
    assert idle["balanced"] * 4 <= idle["client id"], idle
    assert balanced_offsets([[0], [1, 0], []], 3)[:2] == [0, 0] and balanced_offsets([], 3) == []


def test_a_late_joiner_gets_an_offset_without_moving_anyone_elses():
    from fedrouter.config import Config
    from fedrouter.methods import ClientClusters, make_method

    # Five clients train; a sixth joins late (a layout where the joint plan for six differs from the first).
    layout = [[2, 0], [2, 0], [3, 1, 2], [0, 2, 3], [0, 2], [3, 2]]
    first = balanced_offsets(layout[:5], 3)
    assert balanced_offsets(layout, 3)[:5] != first  # unpinned, client 2 would jump part-way through its cycle
    joined = balanced_offsets(layout, 3, fixed=dict(enumerate(first)))
    assert joined[:5] == first
    # The newcomer takes the best offset given the others (brute force over its 2 choices).
    best = min(range(2), key=lambda o: ((u := _updates(layout, [*first, o], 3)) ** 2).sum() + (u.sum(0) ** 2).sum())
    assert joined[5] == best

    # The same through the method: FedRouter schedules before every round, and a late joiner moves nobody.
    method = make_method(Config({"run.method": "fedrouter", "run.rounds": 3}))

    def client(i):
        n = len(layout[i])
        return ClientClusters(i, i, np.zeros((n, 0)), np.ones(n), [], np.zeros((n, 0)), {}, np.array(layout[i]))

    clients = [client(i) for i in range(5)]
    method.schedule(clients)
    before = [[method.jobs(r, c)[0].shared for r in range(3)] for c in clients]
    method.schedule([*clients, client(5)])
    assert [[method.jobs(r, c)[0].shared for r in range(3)] for c in clients] == before
    assert method.jobs(1, client(5))[0].shared == str(layout[5][(1 + best) % 2])


def test_round_robin_is_per_client_and_cosine_schedule():
    assert [scheduled_clusters("round-robin", 2, r) for r in range(4)] == [[0], [1], [0], [1]]
    assert [scheduled_clusters("round-robin", 3, r) for r in range(4)] == [[0], [1], [2], [0]]
    assert scheduled_clusters("all", 3, 5) == [0, 1, 2]
    assert [scheduled_clusters("round-robin", 2, r, offset=1) for r in range(3)] == [[1], [0], [1]]
    rates = [learning_rate(1.0, r, 5, "cosine", 0.1) for r in range(5)]
    assert rates[0] == 1.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates, reverse=True)
    assert learning_rate(1.0, 3, 5, "constant", 0.1) == 1.0


def test_metrics():
    assert rouge("the cat sat", ["the cat sat"])["rouge1"] == pytest.approx(100)
    assert rouge("a dog", ["the cat sat", "a dog ran"])["rouge1"] > 0  # best over references
    assert exact_match("Yes.", ["yes"]) == 100 and exact_match("no", ["yes"]) == 0
    routed = np.array([[5, 1], [0, 4]])  # cluster 0 is mostly task 0 in training, cluster 1 task 1
    assert routing_accuracy(routed, np.array([[20, 0], [1, 20]])) == pytest.approx(9 / 10)


def shared_component_blobs(sizes, dim=32, seed=0, overlap=1.5, common=200.0):
    """Gaussian blobs of the given sizes that overlap and share one large common vector (as LM embeddings do)."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=dim)
    offset *= common / np.linalg.norm(offset)
    means = rng.normal(size=(len(sizes), dim)) * overlap
    points = np.concatenate([offset + m + rng.normal(size=(n, dim)) for m, n in zip(means, sizes, strict=True)])
    return points, np.repeat(np.arange(len(sizes)), sizes)


def test_centred_local_search_finds_unequal_overlapping_groups_and_keeps_centroids_in_place():
    points, truth = shared_component_blobs([40, 25, 12])
    fitted = centred_local_clusters(points, k="auto", k_max=6, threshold=0.11, seed=0)
    assert fitted.n_clusters_ == 3
    table = contingency(fitted.labels_, [str(t) for t in truth], 3, ["0", "1", "2"])
    assert clustering_accuracy(table) == 1.0
    # Centroids are the clusters' mean embeddings (what a client uploads and routes with), not unit directions.
    for j in range(3):
        np.testing.assert_allclose(fitted.centers_[j], points[fitted.labels_ == j].mean(0))
    assert (fitted.predict(points) == fitted.labels_).all()


def test_centred_local_search_keeps_one_task_whole():
    points, _ = shared_component_blobs([48])
    fitted = centred_local_clusters(points, k="auto", k_max=6, threshold=0.11, seed=0)
    assert fitted.n_clusters_ == 1
    np.testing.assert_allclose(fitted.centers_[0], points.mean(0))
    with pytest.raises(ClusteringError, match="client 2's samples: contain NaN"):
        centred_local_clusters(
            np.full((4, 3), np.nan), k="auto", k_max=3, threshold=0.1, seed=0, what="client 2's samples"
        )


def client_centroids(task_of_client, sizes, dim=32, seed=0, common=200.0, separation=1.5):
    """Local centroids, counts and spreads of clients whose samples come from per-task Gaussians."""
    rng = np.random.default_rng(seed)
    offset = rng.normal(size=dim)
    offset *= common / np.linalg.norm(offset)
    means = rng.normal(size=(max(task_of_client) + 1, dim)) * separation
    centroids, spreads = [], []
    for task, n in zip(task_of_client, sizes, strict=True):
        samples = offset + means[task] + rng.normal(size=(n, dim))
        centroids.append(samples.mean(0))
        spreads.append(np.sqrt(((samples - samples.mean(0)) ** 2).sum(1).mean()))
    return np.array(centroids), np.array(sizes, float), np.array(spreads)


def test_agglomerative_groups_local_clusters_by_task_without_being_told_k():
    # Ten local clusters of four tasks, of unequal sizes; task 3 is held by one client only.
    tasks = [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    sizes = [48, 24, 30, 12, 60, 48, 24, 6, 30, 40]
    centroids, counts, spreads = client_centroids(tasks, sizes)
    fitted = ThresholdAgglomerative(threshold=0.4).fit(centroids, sample_weight=counts, spreads=spreads)
    assert fitted.n_clusters_ == 4
    for t in range(4):
        assert len(set(fitted.labels_[np.array(tasks) == t])) == 1
    g = fitted.labels_[0]
    members = fitted.labels_ == g
    np.testing.assert_allclose(fitted.centers_[g], np.average(centroids[members], axis=0, weights=counts[members]))
    assert (fitted.predict(centroids) == fitted.labels_).all()


def test_agglomerative_merges_identical_centroids_and_keeps_one_sample_clusters():
    centroids, counts, spreads = client_centroids([0, 1, 2, 0, 1, 2], [24, 24, 24, 24, 24, 1])
    centroids = np.vstack([centroids, centroids[:1]])  # a seventh centroid identical to the first
    counts, spreads = np.append(counts, 5), np.append(spreads, spreads[0])
    assert spreads[5] == 0  # one sample: no spread
    fitted = ThresholdAgglomerative(0.4).fit(centroids, sample_weight=counts, spreads=spreads)
    assert fitted.labels_[6] == fitted.labels_[0]
    assert fitted.n_clusters_ == 3


def test_agglomerative_sees_that_every_client_holds_the_same_task():
    # Eight clients drawn from one distribution: seen from their mean the centroids point anywhere and never
    # merge; their spreads show the differences are sampling noise, so there is one global cluster.
    centroids, counts, spreads = client_centroids([0] * 8, [96, 48, 96, 24, 96, 96, 60, 96])
    assert ThresholdAgglomerative(0.4).fit(centroids, sample_weight=counts).n_clusters_ == 8
    fitted = ThresholdAgglomerative(0.4).fit(centroids, sample_weight=counts, spreads=spreads)
    assert fitted.n_clusters_ == 1
    np.testing.assert_allclose(fitted.centers_[0], np.average(centroids, axis=0, weights=counts))
    # One client of another task is enough for the noise check to let the tasks apart.
    centroids, counts, spreads = client_centroids([0] * 7 + [1], [96] * 8)
    fitted = ThresholdAgglomerative(0.4).fit(centroids, sample_weight=counts, spreads=spreads)
    assert fitted.n_clusters_ == 2 and len(set(fitted.labels_[:7])) == 1 and fitted.labels_[7] != fitted.labels_[0]


def test_agglomerative_rejects_bad_input_by_name():
    centroids, counts, _ = client_centroids([0, 1], [10, 10])
    with pytest.raises(ClusteringError, match="positive weight"):
        ThresholdAgglomerative().fit(centroids, sample_weight=np.array([1.0, 0.0]))
    with pytest.raises(ClusteringError, match="spread >= 0"):
        ThresholdAgglomerative().fit(centroids, sample_weight=counts, spreads=np.array([1.0, -1.0]))
    with pytest.raises(ClusteringError, match="threshold 3"):
        ThresholdAgglomerative(threshold=3).fit(centroids)
    with pytest.raises(ClusteringError, match="NaN"):
        ThresholdAgglomerative().fit(np.full((2, 3), np.inf))
    assert ThresholdAgglomerative().fit(centroids[:1]).n_clusters_ == 1


def test_refinement_splits_a_local_cluster_that_the_global_centroids_tell_apart():
    # Two overlapping tasks of unequal sizes in one local cluster (too close for a client's silhouette search);
    # global centroids found from other clients' samples of each task separate them.
    rng = np.random.default_rng(0)
    dim = 64
    means = rng.normal(size=(3, dim)) * 3
    means[1] = means[0] + 4 * rng.normal(size=dim) / np.sqrt(dim)  # 4 standard deviations apart
    sizes = [30, 14]
    points = np.concatenate([means[t] + rng.normal(size=(n, dim)) for t, n in zip([0, 1], sizes, strict=True)])
    truth = np.repeat([0, 1], sizes)
    assert centred_local_clusters(points, k="auto", k_max=6, threshold=0.11, seed=0).n_clusters_ == 1
    others = np.stack([m + rng.normal(size=(200, dim)).mean(0) for m in means])  # other clients' centroids
    refined = refine_local_clusters(points, np.zeros(len(points), dtype=np.int64), others)
    assert clustering_accuracy(contingency(refined, [str(t) for t in truth], 2, ["0", "1"])) >= 0.95
    # A cluster the global centroids see as one task stays whole, however the centroids lie around it.
    single = means[2] + rng.normal(size=(40, dim))
    np.testing.assert_array_equal(refine_local_clusters(single, np.zeros(40, dtype=np.int64), others), 0)


def test_refinement_keeps_order_small_clusters_and_the_local_k_limit():
    rng = np.random.default_rng(1)
    dim = 16
    means = rng.normal(size=(4, dim)) * 5
    centers = means + 0.01
    # Local cluster 0 holds tasks 0 and 1, cluster 1 task 2, cluster 2 tasks 2 and 3: both mixed ones split.
    tasks = [0] * 10 + [1] * 10 + [2] * 10 + [2] * 6 + [3] * 6
    labels = np.array([0] * 20 + [1] * 10 + [2] * 12)
    points = means[tasks] + 0.3 * rng.normal(size=(len(tasks), dim))
    refined = refine_local_clusters(points, labels, centers)
    assert refined.max() == 4
    np.testing.assert_array_equal(refined, [0] * 10 + [1] * 10 + [2] * 10 + [3] * 6 + [4] * 6)
    # At most k_max clusters: the larger mixed cluster splits, the smaller stays whole.
    np.testing.assert_array_equal(
        refine_local_clusters(points, labels, centers, k_max=4), [0] * 10 + [1] * 10 + [2] * 10 + [3] * 12
    )
    # One sample, identical points, a part with one sample: nothing to split, no error.
    np.testing.assert_array_equal(refine_local_clusters(points[:1], np.zeros(1, dtype=np.int64), centers), [0])
    same = np.repeat(points[:1], 8, axis=0)
    np.testing.assert_array_equal(refine_local_clusters(same, np.zeros(8, dtype=np.int64), centers), 0)
    lone = np.concatenate([points[:10], points[10:11]])  # nine of task 0 and one of task 1: no part of one
    np.testing.assert_array_equal(refine_local_clusters(lone, np.zeros(11, dtype=np.int64), centers), 0)


def test_refinement_rejects_bad_input_by_name():
    points, labels = blobs(2, per=5, dim=4)
    with pytest.raises(ClusteringError, match="global centroids have 3 dimensions, client 1's samples have 4"):
        refine_local_clusters(points, labels, np.zeros((2, 3)), what="client 1's samples")
    with pytest.raises(ClusteringError, match="one label >= 0 per sample"):
        refine_local_clusters(points, labels[:3], np.zeros((2, 4)))
    with pytest.raises(ClusteringError, match="global centroids: contain NaN"):
        refine_local_clusters(points, labels, np.full((2, 4), np.nan))
    with pytest.raises(ClusteringError, match="share 0.8"):
        refine_local_clusters(points, labels, np.zeros((2, 4)), share=0.8)
