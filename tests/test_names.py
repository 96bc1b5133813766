"""Readable cluster names: made from the clients' label counts, stored in the router artifact, renamed with
`fedrouter rename`, shown by `fedrouter serve` (the adapter ids `cluster_<g>` never change)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import openai
import pytest
from conftest import ANCHORS, Server, tiny_settings, write_tiny_router

from fedrouter import Router
from fedrouter.algorithm.naming import MAX_NAME_LENGTH, check_names, cluster_names, name_problem
from fedrouter.errors import ArtifactError, ConfigError
from fedrouter.serving.artifact import RouterArtifact, read_names, rename_clusters


@pytest.fixture(scope="module")
def tiny_router(tmp_path_factory, tiny_base):
    return write_tiny_router(tmp_path_factory.mktemp("named"), tiny_base)


@pytest.fixture
def run_dir(tiny_router, tmp_path):
    shutil.copytree(tiny_router, tmp_path / "run")
    return tmp_path / "run"


def _router_json(run_dir) -> dict:
    return json.loads((run_dir / "router" / "router.json").read_text())


# --- names from label counts ---


def test_a_cluster_is_named_after_its_majority_task_and_share():
    tasks = {"0": {"qqp": 92, "samsum": 8}, "1": {"webnlg": 2, "gigaword": 1}, "2": {"samsum": 200}}
    assert cluster_names(tasks, 3) == ["qqp (92%)", "webnlg (66%)", "samsum (100%)"]
    assert cluster_names({0: {"b": 5, "a": 5}}, 1) == ["a (50%)"]  # a tie: the first task alphabetically
    assert cluster_names({0: {"qqp": 199, "samsum": 1}}, 1) == ["qqp (99%)"]  # 100% only when every sample is


def test_without_labels_a_cluster_keeps_its_id_as_its_name():
    assert cluster_names({str(g): {} for g in range(3)}, 3) == ["cluster_0", "cluster_1", "cluster_2"]
    assert cluster_names({}, 2) == ["cluster_0", "cluster_1"]
    # Unlabelled samples ("unknown") never name a cluster, but count toward the share of the one that does.
    assert cluster_names({0: {"unknown": 10}, 1: {"unknown": 3, "qqp": 1}}, 2) == ["cluster_0", "qqp (25%)"]


def test_names_are_unique_bounded_and_one_line():
    names = cluster_names({0: {"qqp": 1}, 1: {"QQP": 1}, 2: {"x" * 200: 1}, 3: {"a\nb\t<i>c</i>\x1b": 1}}, 4)
    assert names[:2] == ["qqp (100%) [cluster_0]", "QQP (100%) [cluster_1]"]
    assert len(names[2]) == MAX_NAME_LENGTH and names[2].endswith("... (100%)")
    assert names[3] == "a b <i>c</i> (100%)"  # markup stays text: whoever shows it in HTML escapes it
    check_names(dict(enumerate(names)))


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (" summaries", "space at its start or end"),
        ("x" * (MAX_NAME_LENGTH + 1), f"{MAX_NAME_LENGTH + 1} characters long"),
        ("two\nlines", "control character"),
        ("cluster_3", "another adapter's id"),
        (7, "not a string"),
    ],
)
def test_a_bad_name_is_named_for_what_is_wrong(name, problem):
    assert problem in name_problem(name, 1)


def test_a_name_may_be_its_own_id_and_hold_any_printable_text():
    assert name_problem("cluster_1", 1) is None
    assert name_problem("Zusammenfassungen & <Q/A> «sum»", 1) is None


# --- the artifact ---


def test_the_artifact_round_trips_its_names(run_dir):
    artifact = RouterArtifact.load(run_dir).with_task_names({"0": {"sorting": 3}, "1": {"math": 4, "sorting": 1}})
    assert artifact.names == ["sorting (100%)", "math (80%)", "cluster_2"]
    artifact.save(run_dir)
    assert _router_json(run_dir)["cluster_names"] == {
        "cluster_0": "sorting (100%)",
        "cluster_1": "math (80%)",
        "cluster_2": "cluster_2",
    }
    assert RouterArtifact.load(run_dir).names == artifact.names == read_names(run_dir) == read_names(run_dir / "router")
    router = Router.load(run_dir)
    assert router.names == artifact.names and router.name(1) == "math (80%)" and router.name(None) == "base"
    answers = router.generate([ANCHORS[1], ANCHORS[0]], max_new_tokens=2)
    assert [(a.adapter, a.name) for a in answers] == [(1, "math (80%)"), (0, "sorting (100%)")]
    assert router.generate([ANCHORS[1]], mode="base", max_new_tokens=1)[0].name == "base"


def test_an_artifact_written_before_names_loads_with_its_ids(run_dir):
    meta = _router_json(run_dir)
    del meta["cluster_names"]
    (run_dir / "router" / "router.json").write_text(json.dumps(meta))
    assert RouterArtifact.load(run_dir).names == ["cluster_0", "cluster_1", "cluster_2"] == read_names(run_dir)
    assert rename_clusters(run_dir, {"cluster_1": "arithmetic"}) == ["cluster_0", "arithmetic", "cluster_2"]
    assert _router_json(run_dir) == meta | {
        "cluster_names": {"cluster_0": "cluster_0", "cluster_1": "arithmetic", "cluster_2": "cluster_2"}
    }


def test_names_given_in_memory_are_checked(run_dir):
    artifact = RouterArtifact.load(run_dir)
    with pytest.raises(ValueError, match="2 cluster names for 3 global clusters"):
        RouterArtifact(**{**vars(artifact), "names": ["a", "b"]})
    with pytest.raises(ValueError, match="cluster_2: name 'A' is cluster_0's name too"):
        RouterArtifact(**{**vars(artifact), "names": ["a", "b", "A"]})


# --- renaming ---


def test_rename_changes_only_the_names_and_accepts_a_router_folder(run_dir):
    before = _router_json(run_dir)
    assert rename_clusters(run_dir / "router", {"cluster_2": " reviews ", "cluster_0": "sorting"}) == [
        "sorting",
        "cluster_1",
        "reviews",
    ]
    after = _router_json(run_dir)
    assert after == before | {
        "cluster_names": {"cluster_0": "sorting", "cluster_1": "cluster_1", "cluster_2": "reviews"}
    }
    assert [p.name for p in (run_dir / "router").iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize(
    ("renames", "says"),
    [
        ({"cluster_7": "x"}, "'cluster_7' is no adapter of "),
        ({"2": "x"}, "(expected cluster_0 to cluster_2)"),
        ({"cluster_1": ""}, "cluster_1: name '': empty"),
        ({"cluster_1": "cluster_2"}, "cluster_1: name 'cluster_2': another adapter's id"),
        ({"cluster_1": "Cluster_0"}, "cluster_1: name 'Cluster_0' is cluster_0's name too"),
        ({"cluster_0": "same", "cluster_1": "same"}, "cluster_1: name 'same' is cluster_0's name too"),
        ({"cluster_1": "a\rb"}, "control character"),
        ({}, "no CLUSTER=NAME given"),
    ],
)
def test_rename_refuses_bad_input_and_writes_nothing(run_dir, renames, says):
    before = (run_dir / "router" / "router.json").read_bytes()
    with pytest.raises(ConfigError, match="^rename: ") as caught:
        rename_clusters(run_dir, renames)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert (run_dir / "router" / "router.json").read_bytes() == before


def test_rename_refuses_a_folder_without_a_router(tmp_path):
    with pytest.raises(ArtifactError, match="no router artifact"):
        rename_clusters(tmp_path, {"cluster_0": "x"})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrouter.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_fedrouter_rename_changes_what_serve_lists(run_dir, tmp_path):
    done = _cli("rename", str(run_dir), "cluster_2=reviews", "cluster_0=word sorting")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["cluster_0: word sorting", "cluster_1: cluster_1", "cluster_2: reviews"]
    for bad, says in (
        (["cluster_9=x"], "'cluster_9' is no adapter of"),
        (["cluster_1=reviews"], "cluster_1: name 'reviews' is cluster_2's name too"),
        (["cluster_1"], "'cluster_1' is not CLUSTER=NAME"),
        (["cluster_1=a", "cluster_1=b"], "'cluster_1' is given twice"),
        (["cluster_1=" + "x" * 65], "65 characters long (at most 64)"),
    ):
        refused = _cli("rename", str(run_dir), *bad)
        assert refused.returncode == 2 and refused.stdout == ""
        assert refused.stderr.startswith("fedrouter: error: rename: ") and refused.stderr.count("\n") == 1
        assert says in refused.stderr, refused.stderr
    server = Server(run_dir, tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
        models = {m.id: m.model_extra["description"] for m in client.models.list().data}
        assert [models[f"cluster_{g}"] for g in range(3)] == ["word sorting", "cluster_1", "reviews"]
        assert models["fedrouter"].startswith("routes each prompt") and models["base"] == "the base model, no adapter"
        answer = client.chat.completions.create(
            model="fedrouter", messages=[{"role": "user", "content": ANCHORS[2]}], max_tokens=2
        )
        assert answer.model_extra["fedrouter"]["adapter"] == "cluster_2"
        assert answer.model_extra["fedrouter"]["name"] == "reviews"
    finally:
        server.stop()


# --- a run names its clusters ---


@pytest.mark.slow
def test_a_run_names_its_clusters_from_the_clients_label_counts(tmp_path):
    from fedrouter.config import Config
    from fedrouter.simulation import run_experiment

    cfg = Config(tiny_settings(tmp_path, **{"run.rounds": 0, "eval.sets": "none"}))
    run_dir, metrics = run_experiment(cfg, tmp_path / "labelled")
    tasks = metrics["clustering"]["global_cluster_tasks"]
    names = RouterArtifact.load(run_dir).names
    assert names == cluster_names(tasks, 4)
    labelled = [g for g in range(4) if tasks[str(g)]]
    assert labelled and all(names[g].endswith("%)") and names[g].split(" (")[0] in tasks[str(g)] for g in labelled)


def test_the_run_summary_names_every_adapter():
    from rich.console import Console

    from fedrouter.report import summary_tables

    metrics = {"clustering": {"global_k": 2, "global_cluster_tasks": {"0": {"qqp": 9, "webnlg": 1}, "1": {"[b]": 3}}}}

    def shown(names=None) -> str:
        console = Console(width=200, record=True)
        for table in summary_tables(metrics, names):
            console.print(table)
        return console.export_text()

    assert "cluster_0: qqp (90%), cluster_1: [b] (100%)" in shown()  # a name is text, never rich markup
    assert "cluster_0: paraphrases, cluster_1: [b] (100%)" in shown(["paraphrases", "[b] (100%)"])  # renamed
