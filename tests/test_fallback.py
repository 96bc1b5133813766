"""The fallback route (`routing.fallback`): a prompt beyond `routing.fallback_factor` x its cluster's radius goes to
the base model or a chosen adapter, the same way in a run's evaluation, in `Router` and in `fedrouter serve`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import openai
import pytest
from conftest import ANCHORS, Server, tiny_settings, write_tiny_router

from fedrouter import Router
from fedrouter.config import Config
from fedrouter.errors import ArtifactError, ConfigError
from fedrouter.serving.artifact import RouterArtifact

FAR = "Translate to French: the weather is lovely today and the sea is calm."


@pytest.fixture(scope="module")
def tiny_router(tmp_path_factory, tiny_base):
    return write_tiny_router(tmp_path_factory.mktemp("fallback"), tiny_base)


def _with_radii(run_dir, tmp_path, radii, route="none", factor=1.5):
    """A copy of the tiny router recording ``radii`` and a fallback."""
    artifact = RouterArtifact.load(run_dir)
    out = tmp_path / "run"
    out.mkdir()
    replace(artifact, radii=np.asarray(radii, float), fallback=route, fallback_factor=factor, folder=None).save(out)
    return out


# --- Router ---


def test_a_prompt_on_its_centroid_stays_and_a_far_one_falls_back(tiny_router, tiny_base, tmp_path):
    router = Router(RouterArtifact.load(tiny_router), tiny_base)
    nearest = router.generate([FAR], max_new_tokens=2)[0]
    # Radii such that FAR lies at 0.9 x its cluster's radius: factor 1.0 keeps it, 0.5 sends it to the fallback.
    radii = np.full(3, nearest.distance / 0.9)
    run = _with_radii(tiny_router, tmp_path, radii, route="base", factor=1.0)
    router = Router(RouterArtifact.load(run), tiny_base)
    kept = router.generate([FAR, ANCHORS[0]], max_new_tokens=2)
    assert [(a.adapter, a.fallback) for a in kept] == [(nearest.adapter, False), (0, False)]
    router.set_fallback(factor=0.5)
    far, anchor = router.generate([FAR, ANCHORS[0]], max_new_tokens=2)
    assert (far.adapter, far.name, far.fallback) == (None, "base", True)
    assert far.distance == pytest.approx(nearest.distance)  # the distance that decided is still reported
    assert (anchor.adapter, anchor.fallback) == (0, False)  # on its centroid: never falls back
    assert list(router.route([FAR, ANCHORS[0]])) == [-1, 0]
    # To an adapter, named by index or by its cluster's name; none switches it off.
    router.set_fallback("2")
    assert (router.generate([FAR], max_new_tokens=2)[0].adapter, router.artifact.fallback) == (2, "2")
    router.set_fallback(router.names[1])
    assert router.generate([FAR], max_new_tokens=2)[0].adapter == 1
    router.set_fallback("none")
    assert router.generate([FAR], max_new_tokens=2)[0] == replace(nearest, prompt=FAR)


def test_the_fallback_is_recorded_in_the_artifact_and_checked(tiny_router, tmp_path):
    run = _with_radii(tiny_router, tmp_path, [1.0, 2.0, 3.0], route="base", factor=2.5)
    meta = json.loads((run / "router" / "router.json").read_text())
    assert meta["cluster_radii"] == [1.0, 2.0, 3.0] and meta["fallback"] == {"route": "base", "factor": 2.5}
    loaded = RouterArtifact.load(run)
    assert list(loaded.radii) == [1.0, 2.0, 3.0] and (loaded.fallback, loaded.fallback_factor) == ("base", 2.5)
    # An artifact written before radii existed loads with no fallback.
    assert RouterArtifact.load(tiny_router).radii is None and RouterArtifact.load(tiny_router).fallback == "none"
    path = run / "router" / "router.json"
    for change, says in [
        ({"cluster_radii": [1.0, 2.0]}, "cluster_radii [1.0, 2.0] (expected 3 finite numbers >= 0"),
        ({"cluster_radii": [1.0, -2.0, 3.0]}, "cluster_radii [1.0, -2.0, 3.0] (expected 3 finite numbers >= 0"),
        ({"cluster_radii": "wide"}, "cluster_radii 'wide'"),
        ({"fallback": {"route": "7", "factor": 1.0}}, "fallback: route '7' (expected 'none', 'base' or a cluster's"),
        ({"fallback": {"route": "base", "factor": -1}}, "fallback: factor -1 (expected a finite number > 0)"),
        ({"fallback": ["base"]}, "fallback ['base'] (expected an object with route and factor)"),
        ({"cluster_radii": None}, "fallback: route 'base' needs the clusters' radii"),
    ]:
        damaged = dict(meta) | change
        damaged = {k: v for k, v in damaged.items() if v is not None}
        path.write_text(json.dumps(damaged))
        with pytest.raises(ArtifactError, match=_escaped(f"{path}: {says}")):
            RouterArtifact.load(run)


def _escaped(text: str) -> str:
    import re

    return re.escape(text)


def test_a_router_without_radii_refuses_a_fallback(tiny_router, tiny_base):
    with pytest.raises(ConfigError, match="fallback: route 'base' needs the clusters' radii"):
        Router.load(tiny_router, fallback="base")
    with pytest.raises(ConfigError, match="fallback: route 'nine' \\(expected 'none', 'base' or a cluster's index"):
        Router.load(tiny_router, fallback="nine")


# --- settings ---


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"routing.fallback": "somewhere"}, "'none', 'base' or a global cluster's index"),
        ({"routing.fallback": "base", "run.method": "fedit"}, "applies to a router; run.method 'fedit'"),
        ({"routing.fallback": "base", "privacy.centroid_clip": 1.0}, "do not send under 'privacy.centroid_clip'"),
        ({"routing.fallback_factor": 0.0}, "at least 0.1"),
    ],
)
def test_fallback_settings_are_checked(settings, says):
    with pytest.raises(ConfigError, match=_escaped(says)):
        Config(settings)


# --- a run: evaluation applies the rule Router applies ---


@pytest.mark.slow
def test_a_run_falls_back_in_evaluation_as_its_router_does(tmp_path, tiny_base):
    from fedrouter.data import all_clients
    from fedrouter.simulation import run_experiment

    settings = tiny_settings(
        tmp_path,
        **{
            "run.rounds": 1,
            "eval.sets": "personalized,generalization",
            "eval.routing": "global",
            "routing.fallback": "base",
            "routing.fallback_factor": 1.0,
            "data.unseen_tasks": "sentiment",
        },
    )
    cfg = Config(settings)
    run_dir, metrics = run_experiment(cfg, tmp_path / "fallback")
    router = Router.load(run_dir)
    artifact = router.artifact
    assert (artifact.fallback, artifact.fallback_factor) == ("base", 1.0)
    assert artifact.radii is not None and (artifact.radii > 0).all() and len(artifact.radii) == artifact.num_global
    general = metrics["evaluation"]["by_set"]["generalization/global"]
    assert "sentiment" in general["per_task"]  # held out of training, still asked
    # Route the same test prompts with the saved router: it falls back for as many of each task as evaluation did.
    fell, total = {}, {}
    for client in all_clients(cfg):
        tests = client.tests["generalization"]
        for sample, choice in zip(
            tests, router.choose([s.instruction for s in tests], _global(len(tests))), strict=True
        ):
            fell[sample.task] = fell.get(sample.task, 0) + choice.fallback
            total[sample.task] = total.get(sample.task, 0) + 1
    shares = general["fallback"]["per_task"]
    assert {task: round(shares[task] * total[task]) for task in total} == fell
    routed_to_base = {task: counts.get("base", 0) for task, counts in general["routed"].items()}
    assert routed_to_base == fell
    assert 0 < sum(fell.values()) < sum(total.values()), (fell, total)  # factor 1: some fall back, not all
    assert general["fallback"]["share"] == pytest.approx(sum(fell.values()) / sum(total.values()))


def _global(n):
    from fedrouter.serving.router import Route

    return [Route("global")] * n


# --- the server and the CLI ---


@pytest.mark.slow
def test_serve_and_generate_report_the_fallback(tiny_router, tiny_base, tmp_path):
    router = Router(RouterArtifact.load(tiny_router), tiny_base)
    distance = router.generate([FAR], max_new_tokens=1)[0].distance
    run = _with_radii(tiny_router, tmp_path, np.full(3, distance), route="none")
    server = Server(run, tmp_path / "serve.log", "--fallback", "base", "--fallback-factor", "0.5")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        raw = client.chat.completions.with_raw_response.create(
            model="fedrouter", messages=[{"role": "user", "content": FAR}], max_tokens=2
        )
        info = raw.parse().model_extra["fedrouter"]
        assert (info["adapter"], info["name"], info["fallback"]) == ("base", "base", True)
        assert raw.headers["X-FedRouter-Fallback"] == "true"
        near = client.chat.completions.create(
            model="fedrouter", messages=[{"role": "user", "content": ANCHORS[1]}], max_tokens=2
        )
        assert (near.model_extra["fedrouter"]["adapter"], near.model_extra["fedrouter"]["fallback"]) == (
            "cluster_1",
            False,
        )
    finally:
        server.stop()
    done = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "generate", "--run", str(run), "--prompt", FAR, "--prompt", ANCHORS[2],
         "--max-new-tokens", "1", "--fallback", "base", "--fallback-factor", "0.5", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["adapter"], line["name"], line["fallback"]) for line in lines] == [
        (None, "base", True),
        (2, router.names[2], False),
    ]
    refused = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "generate", "--run", str(tiny_router), "--prompt", FAR, "--fallback", "base"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2 and "fallback: route 'base' needs the clusters' radii" in refused.stderr
