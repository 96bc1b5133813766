"""One decoder: every method's evaluation answers a test sample as ``Router.generate`` and ``fedrouter serve`` answer
the same prompt with the same adapter (tiny random model, fp32, greedy). The run-level check, a FedRouter run's
answers against its own router artifact, is in ``test_end_to_end.py``."""

from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server
from test_answering import _inputs, _random_adapter

from fedrouter import Router, discovery
from fedrouter.federated.answering import answer_tests
from fedrouter.methods import methods
from fedrouter.model import LoraSettings, lora
from fedrouter.model.prompts import prompt_ids
from fedrouter.serving.artifact import RouterArtifact


def _artifact(base, adapters: list[dict], folder: Path) -> Path:
    """A router artifact whose clusters 0, 1, ... hold these adapters, at their rank with the model's scaling."""
    rank, config = lora.rank(adapters[0]), base.lora
    settings = LoraSettings(
        rank, config.lora_alpha * rank / config.r, config.lora_dropout, tuple(sorted(config.target_modules))
    )
    space = discovery.embedding_space(base, discovery.EmbeddingSettings())
    width = space.embed(base, ["any text"]).shape[1]
    folder.mkdir(exist_ok=True)
    centroids = np.random.default_rng(0).normal(size=(len(adapters), width)).astype(np.float32)
    RouterArtifact(
        base_model=base.name,
        model_name="tiny-random",
        lora=settings,
        global_centroids=centroids,
        local_centroids={0: centroids},
        cluster_map={0: list(range(len(adapters)))},
        adapters=dict(enumerate(adapters)),
        precision="fp32",
        embedding=discovery.EmbeddingSettings(),
    ).save(folder)
    return folder


def _evaluated(tiny_base, tmp_path, name):
    """A client's evaluation under the method: its answers per adapter key (prompt -> answer), the key's adapter
    as a router artifact's cluster (None: the base model), and the artifact's folder."""
    cfg, client, method, serving = _inputs(tiny_base, tmp_path, name)
    answers, _ = answer_tests(method, serving, client.tests, method.modes(cfg))
    by_key: dict[tuple, dict[str, str]] = defaultdict(dict)
    for (set_name, _), rows in answers.items():
        for sample, (key, text) in zip(client.tests[set_name], rows, strict=True):
            assert prompt_ids(tiny_base.tokenizer, sample.prompt, cfg["model.max_seq_len"]) == prompt_ids(
                tiny_base.tokenizer, sample.prompt, 10_000
            )  # short prompts: evaluation reads them whole, as the router does
            by_key[key][sample.prompt] = text
    adapters = {key: method.adapter(serving, key) for key in sorted(by_key)}
    trained = [key for key, arrays in adapters.items() if arrays is not None]
    # Zero-shot answers with the base model only; its artifact holds one adapter that no answer uses.
    held = [adapters[key] for key in trained] or [_random_adapter(tiny_base, 0)]
    cluster = {key: (trained.index(key) if key in trained else None) for key in adapters}
    return cfg, by_key, cluster, _artifact(tiny_base, held, tmp_path / "run")


@pytest.mark.parametrize("name", sorted(methods()))
def test_evaluation_answers_as_router_generate_with_the_same_adapter(tiny_base, tmp_path, name):
    cfg, by_key, cluster, run_dir = _evaluated(tiny_base, tmp_path, name)
    router = Router.load(run_dir)
    texts = set()
    for key, expected in by_key.items():
        prompts = list(expected)
        g = cluster[key]
        route = {"mode": "base"} if g is None else {"mode": "cluster", "cluster": g}
        got = router.generate(prompts, max_new_tokens=cfg["eval.max_new_tokens"], **route)
        assert [a.text for a in got] == [expected[p] for p in prompts], key
        texts |= set(expected.values())
    # The adapters' answers differ, so equal lists are not all one string (the random base model ends at once).
    assert len(texts) > 1 or set(cluster.values()) == {None}


def test_evaluation_answers_as_the_server_with_the_same_adapter(tiny_base, tmp_path):
    """FedDPA's weighted pair of adapters (one adapter of twice the rank) served by ``fedrouter serve``."""
    cfg, by_key, cluster, run_dir = _evaluated(tiny_base, tmp_path, "feddpa")
    server = Server(run_dir, tmp_path / "serve.log")
    try:
        for key, expected in by_key.items():
            for prompt, text in expected.items():
                response = httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={
                        "model": f"cluster_{cluster[key]}",
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": cfg["eval.max_new_tokens"],
                        "temperature": 0,
                    },
                    timeout=60,
                )
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["message"]["content"] == text, (key, prompt)
    finally:
        server.stop()
