"""A damaged router artifact is refused at load, by `Router.load`, `fedrouter generate` and `fedrouter serve`: one
line naming the file and what was expected, exit code 2, no traceback, never an answer from damaged values.

One tiny router (conftest's ``write_tiny_router``) is written once; each case copies it and damages the copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import ANCHORS, write_tiny_router
from safetensors.numpy import load_file, save_file

from fedrouter import Router, cli
from fedrouter.errors import ArtifactError, ConfigError
from fedrouter.model import LoraSettings
from fedrouter.model.loading import load_base_model
from fedrouter.serving.artifact import RouterArtifact, check_base, read_base

A0 = "adapters/cluster_0/adapter_model.safetensors"
A1 = "adapters/cluster_1/adapter_model.safetensors"


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path], None]  # given the copy's router folder
    file: str  # the file (or folder) the message must name
    says: str  # and part of what it says was wrong or expected


def _json(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def _meta(**values: object) -> Callable[[Path], None]:
    def damage(router: Path) -> None:
        _json(router / "router.json", lambda meta: meta.update(values))

    return damage


def _drop_key(key: str) -> Callable[[Path], None]:
    return lambda router: _json(router / "router.json", lambda meta: meta.pop(key) and None)


def _tensors(relative: str, change: Callable[[dict], dict | None], *more: str) -> Callable[[Path], None]:
    def damage(router: Path) -> None:
        for name in (relative, *more):
            tensors = load_file(router / name)
            save_file(change(tensors) or tensors, router / name)

    return damage


def _centroids(change: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def damage(router: Path) -> None:
        path = router / "global_centroids.npy"
        np.save(path, change(np.load(path)), allow_pickle=False)

    return damage


def _truncate(relative: str, keep: float) -> Callable[[Path], None]:
    def damage(router: Path) -> None:
        data = (router / relative).read_bytes()
        (router / relative).write_bytes(data[: int(len(data) * keep)])

    return damage


def _unlink(relative: str) -> Callable[[Path], None]:
    return lambda router: (router / relative).unlink()


def _set(key: str, index: tuple, value: float) -> Callable[[dict], None]:
    return lambda tensors: tensors[key].__setitem__(index, value)


def _rank(tensors: dict) -> dict:
    return {k: v[:4] if k.endswith("lora_A.weight") else v[:, :4] for k, v in tensors.items()}


def _first_key(tensors: dict) -> str:
    return sorted(tensors)[0]


def _drop_first(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k != _first_key(tensors)}


def _narrow_first(tensors: dict) -> dict:
    return tensors | {_first_key(tensors): tensors[_first_key(tensors)][:, :32].copy()}


def _width(width: int) -> Callable[[Path], None]:
    """Every centroid (and router.json) of another width: consistent files, but not the model's width."""

    def damage(router: Path) -> None:
        _centroids(lambda c: c[:, :width].copy())(router)
        _tensors("local_centroids.safetensors", lambda t: {k: v[:, :width].copy() for k, v in t.items()})(router)
        _meta(hidden_size=width)(router)

    return damage


def _symlink_outside(router: Path) -> None:
    outside = router.parent / "elsewhere.safetensors"
    (router / A0).rename(outside)
    (router / A0).symlink_to(outside)


def _symlink_inside(router: Path) -> None:
    (router / A1).unlink()
    (router / A1).symlink_to(Path("..") / "cluster_0" / "adapter_model.safetensors")


def _symlink_folder(router: Path) -> None:
    moved = router.parent / "real-router"
    router.rename(moved)
    router.symlink_to(moved, target_is_directory=True)


def _extra_adapter(router: Path) -> None:
    shutil.copytree(router / "adapters" / "cluster_2", router / "adapters" / "cluster_3")


def _pipe(router: Path) -> None:
    (router / "cluster_map.json").unlink()
    os.mkfifo(router / "cluster_map.json")


def _pickled(router: Path) -> None:
    np.save(router / "global_centroids.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)


def _nan_text(router: Path) -> None:
    path = router / "router.json"
    path.write_text(path.read_text().replace('"max_seq_len": 256', '"max_seq_len": NaN'))


def _cluster_map(value: object) -> Callable[[Path], None]:
    return lambda router: (router / "cluster_map.json").write_text(json.dumps(value))


CASES = [
    # missing files
    Case("no router.json", _unlink("router.json"), "router.json", "no router artifact"),
    Case("no global centroids", _unlink("global_centroids.npy"), "global_centroids.npy", "missing"),
    Case("no local centroids", _unlink("local_centroids.safetensors"), "local_centroids.safetensors", "missing"),
    Case("no cluster map", _unlink("cluster_map.json"), "cluster_map.json", "missing"),
    Case("no adapter weights", _unlink(A1), A1, "missing"),
    Case(
        "no adapter config",
        _unlink("adapters/cluster_2/adapter_config.json"),
        "cluster_2/adapter_config.json",
        "missing",
    ),
    # damaged files
    Case("truncated adapter", _truncate(A0, 0.5), A0, "not a readable safetensors file"),
    Case("truncated adapter header", _truncate(A0, 0.01), A0, "not a readable safetensors file"),
    Case(
        "truncated local centroids",
        _truncate("local_centroids.safetensors", 0.6),
        "local_centroids.safetensors",
        "not a readable safetensors file",
    ),
    Case(
        "truncated global centroids",
        _truncate("global_centroids.npy", 0.5),
        "global_centroids.npy",
        "not a readable .npy array",
    ),
    Case("pickled centroids", _pickled, "global_centroids.npy", "not a readable .npy array"),
    Case("a pipe for a file", _pipe, "cluster_map.json", "not a regular file"),
    # values that are not finite
    Case(
        "NaN global centroid",
        _centroids(lambda c: np.where(np.arange(c.size).reshape(c.shape) == 5, np.nan, c)),
        "global_centroids.npy",
        "1 of 384 values not finite",
    ),
    Case(
        "infinite local centroid",
        _tensors("local_centroids.safetensors", _set("client_0", (0, 0), np.inf)),
        "local_centroids.safetensors",
        "not finite",
    ),
    Case(
        "all-NaN adapter",
        _tensors(A1, lambda t: {k: np.full_like(v, np.nan) for k, v in t.items()}),
        A1,
        "not finite",
    ),
    Case(
        "float64 overflowing float32",
        _centroids(lambda c: c.astype(np.float64) * 1e300),
        "global_centroids.npy",
        "not finite",
    ),
    # dtypes, shapes, ranks and tensors
    Case("integer adapter", _tensors(A0, lambda t: {k: v.astype(np.int32) for k, v in t.items()}), A0, "float32"),
    Case("adapter of rank 4", _tensors(A0, _rank), A0, "expected rank 8, the lora.r of router.json"),
    Case(
        "router.json r 4",
        lambda r: _json(r / "router.json", lambda m: m["lora"].update(r=4)),
        A0,
        "expected rank 4, the lora.r of router.json",
    ),
    Case("a tensor missing in one cluster", _tensors(A1, _drop_first), A1, "cluster 0's adapter"),
    Case(
        "a tensor missing in every cluster",
        _tensors(A0, _drop_first, A1, "adapters/cluster_2/adapter_model.safetensors"),
        A0,
        "LoRA tensors model 'tiny-random' has",
    ),
    Case(
        "a foreign tensor in every cluster",
        _tensors(
            A0,
            lambda t: t | {"lm_head.weight": np.zeros((2, 2), np.float32)},
            A1,
            "adapters/cluster_2/adapter_model.safetensors",
        ),
        A0,
        "is no LoRA weight of model 'tiny-random'",
    ),
    Case(
        "an adapter tensor of the wrong width",
        _tensors(A0, _narrow_first, A1, "adapters/cluster_2/adapter_model.safetensors"),
        A0,
        "expected (8, 64)",
    ),
    Case(
        "global centroids of the wrong width",
        _centroids(lambda c: c[:, :96].copy()),
        "global_centroids.npy",
        "96 wide (expected 128: hidden_size of router.json)",
    ),
    Case("centroids of another model's width", _width(96), "global_centroids.npy", "embeds prompts in 128 dimensions"),
    Case("more clusters in router.json", _meta(num_global_clusters=4), "global_centroids.npy", "expected (4, "),
    Case("an extra adapter folder", _extra_adapter, "adapters", "cluster_3"),
    Case(
        "adapter config of another rank",
        lambda r: _json(r / "adapters/cluster_1/adapter_config.json", lambda c: c.update(r=4)),
        "adapters/cluster_1/adapter_config.json",
        "r 4 (expected 8",
    ),
    # symbolic links
    Case("adapter linked outside the folder", _symlink_outside, A0, "symbolic link"),
    Case("adapter linked inside the folder", _symlink_inside, A1, "symbolic link"),
    Case("router folder linked", _symlink_folder, "router", "symbolic link"),
    # router.json
    Case("router.json a list", lambda r: (r / "router.json").write_text("[1, 2]"), "router.json", "a list at the top"),
    Case("router.json not JSON", _truncate("router.json", 0.5), "router.json", "not readable JSON"),
    Case("no base_model", _drop_key("base_model"), "router.json", "no base_model"),
    Case("no hidden_size", _drop_key("hidden_size"), "router.json", "no hidden_size"),
    Case("precision fp8", _meta(precision="fp8"), "router.json", "precision 'fp8'"),
    Case("max_seq_len -5", _meta(max_seq_len=-5), "router.json", "max_seq_len -5"),
    Case("max_seq_len a string", _meta(max_seq_len="256"), "router.json", "max_seq_len '256'"),
    Case("max_seq_len NaN", _nan_text, "router.json", "NaN is not a JSON value"),
    Case("hidden_size wrong", _meta(hidden_size=99), "router.json", "hidden_size 99"),
    Case("format_version 2", _meta(format_version=2), "router.json", "format_version 2"),
    Case("model_name not a string", _meta(model_name=["tiny"]), "router.json", "model_name ['tiny']"),
    Case("lora not an object", _meta(lora=8), "router.json", "expected r, lora_alpha"),
    Case(
        "embedding kind unknown",
        lambda r: _json(r / "router.json", lambda m: m["embedding"].update(kind="image")),
        "router.json",
        "'embedding' must be",
    ),
    # router.json's cluster names (absent: the ids; present: one valid, unique name per adapter)
    Case("cluster_names a list", _meta(cluster_names=["a", "b", "c"]), "router.json", "cluster_names is a list"),
    Case(
        "cluster_names without cluster_2",
        _meta(cluster_names={"cluster_0": "a", "cluster_1": "b"}),
        "router.json",
        "expected an object with one name for each of cluster_0 to cluster_2",
    ),
    Case(
        "a cluster name over two lines",
        _meta(cluster_names={"cluster_0": "a", "cluster_1": "b\nc", "cluster_2": "d"}),
        "router.json",
        "cluster_1: name 'b\\nc': holds a control character",
    ),
    Case(
        "two clusters of one name",
        _meta(cluster_names={"cluster_0": "sums", "cluster_1": "b", "cluster_2": "Sums"}),
        "router.json",
        "cluster_2: name 'Sums' is cluster_0's name too",
    ),
    Case(
        "a cluster named after another's id",
        _meta(cluster_names={"cluster_0": "cluster_1", "cluster_1": "b", "cluster_2": "c"}),
        "router.json",
        "another adapter's id",
    ),
    Case(
        "a cluster name not a string",
        _meta(cluster_names={"cluster_0": 5, "cluster_1": "b", "cluster_2": "c"}),
        "router.json",
        "not a string",
    ),
    # router.json's base record (absent: an older artifact, loads; present: checked by its kind)
    Case("base not an object", _meta(base="smollm2"), "router.json", "base: expected an object"),
    Case("base of an unknown kind", _meta(base={"kind": "onnx"}), "router.json", "base: kind 'onnx'"),
    Case(
        "base gguf hash not a sha256",
        _meta(base={"kind": "gguf", "file": "m.gguf", "sha256": "abc", "quantization": "Q4_1", "dequantized": "/m"}),
        "router.json",
        "base: sha256 'abc' (expected a sha256",
    ),
    Case(
        "base folder without its digest",
        _meta(base={"kind": "folder", "path": "/models/m"}),
        "router.json",
        "base: weights_sha256 None",
    ),
    Case(
        "base with a field of another kind",
        _meta(base={"kind": "builtin", "name": "tiny-random", "revision": "main"}),
        "router.json",
        "base: unknown field 'revision' for kind 'builtin'",
    ),
    # cluster_map.json
    Case("cluster map a list", _cluster_map([[0, 1], [2]]), "cluster_map.json", "a list at the top"),
    Case("cluster out of range", _cluster_map({"0": [0, 7], "1": [2]}), "cluster_map.json", "each 0 to 2"),
    Case("client id not a number", _cluster_map({"zero": [0, 1], "1": [2]}), "cluster_map.json", "key 'zero'"),
    Case("fewer local clusters", _cluster_map({"0": [0], "1": [2]}), "local_centroids.safetensors", "expected (1, "),
    Case(
        "a client without centroids",
        _cluster_map({"0": [0, 1], "1": [2], "2": [1]}),
        "local_centroids.safetensors",
        "no tensor 'client_2'",
    ),
]
# Cases for the real command line in a subprocess (the in-process cases go through `cli.main` too).
SUBPROCESS = (
    "truncated adapter",
    "NaN global centroid",
    "a tensor missing in every cluster",
    "adapter linked outside the folder",
    "precision fp8",
)
SERVED = ("all-NaN adapter", "centroids of another model's width")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, tiny_base) -> Path:
    return write_tiny_router(tmp_path_factory.mktemp("pristine"), tiny_base)


def _damaged(pristine: Path, tmp_path: Path, name: str) -> tuple[Path, Case]:
    case = next(c for c in CASES if c.name == name)
    run = tmp_path / "run"
    shutil.copytree(pristine, run, symlinks=True)
    case.damage(run / "router")
    return run, case


def _check_message(message: str, case: Case) -> None:
    assert "\n" not in message and "Traceback" not in message, message
    assert case.file in message and case.says in message, message


def test_the_intact_artifact_loads_and_answers(pristine):
    router = Router.load(pristine)
    assert router.artifact.folder == pristine / "router"
    assert [a.adapter for a in router.generate(list(ANCHORS), max_new_tokens=2)] == [0, 1, 2]


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_a_damaged_artifact_is_refused_in_one_line_naming_the_file(pristine, tmp_path, name, capsys, monkeypatch):
    run, case = _damaged(pristine, tmp_path, name)
    with pytest.raises(ArtifactError) as caught:
        Router.load(run)
    error = caught.value
    _check_message(str(error), case)
    # Nothing read from the file travels in a chained exception's traceback.
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    capsys.readouterr()
    monkeypatch.setattr(cli, "_quiet_libraries", lambda: None)  # leave this process's logging as it is
    assert cli.main(["generate", "--run", str(run), "--prompt", ANCHORS[0], "--max-new-tokens", "2"]) == 2
    assert capsys.readouterr().err == f"fedrouter: error: {error}\n"


def test_the_artifact_records_its_base_and_one_saved_before_the_record_still_loads(pristine, tmp_path):
    assert read_base(pristine) == {"kind": "builtin", "name": "tiny-random"}
    assert RouterArtifact.load(pristine).base_identity == read_base(pristine)
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    _drop_key("base")(run / "router")
    assert read_base(run) is None and RouterArtifact.load(run).base_identity is None
    check_base(run, "anything")  # nothing recorded: nothing to compare


def test_a_model_with_other_lora_settings_is_refused_by_the_artifact(pristine):
    other = load_base_model("tiny-random", precision="fp32", lora=LoraSettings(r=4))
    with pytest.raises(ArtifactError, match=r"router/router\.json: LoRA r, alpha and modules \(8, "):
        Router(RouterArtifact.load(pristine), other)


def test_a_precision_given_to_load_is_checked(pristine):
    with pytest.raises(ConfigError, match="precision 'fp8': expected one of auto, bf16, fp32"):
        Router.load(pristine, precision="fp8")


_SERVER_LOG = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO fedrouter[.\w]*: ")


def _assert_refused(done: subprocess.CompletedProcess, case: Case) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    # `fedrouter serve` logs its own progress (loading the base model) to stderr before it can check the fit.
    lines = [line for line in done.stderr.splitlines() if not _SERVER_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith("fedrouter: error: "), done.stderr[-2000:]
    _check_message(lines[0], case)
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS)
def test_fedrouter_generate_refuses_a_damaged_artifact(pristine, tmp_path, name):
    run, case = _damaged(pristine, tmp_path, name)
    done = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "generate", "--run", str(run), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_refused(done, case)


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED)
def test_fedrouter_serve_refuses_a_damaged_artifact_before_serving(pristine, tmp_path, name):
    from fedrouter.deploy import free_port

    run, case = _damaged(pristine, tmp_path, name)
    done = subprocess.run(
        [sys.executable, "-m", "fedrouter.cli", "serve", str(run), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_refused(done, case)
