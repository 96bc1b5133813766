"""`fedrouter bench`: records with the benchmark's keys, resume, tables and plots (tiny model, real paper4 data)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA

from fedrouter import bench
from fedrouter.bench.report import gain, write_report
from fedrouter.errors import ConfigError

REQUIRED = [
    "method",
    "scenario",
    "eval_mode",
    "seed",
    "rouge1",
    "rouge2",
    "rougeL",
    "rouge1_per_task",
    "exact_match_qqp",
    "cluster_acc_local",
    "cluster_acc_global",
    "routing_acc",
    "wall_s",
    "round_s",
    "bytes_up_per_round",
    "bytes_down_per_round",
    "peak_rss_mb",
    "commit",
    "machine",
    "profile",
]
TINY = {
    "model.name": "tiny-random",
    "data.num_clients": 4,
    "data.train_per_client": 8,
    "data.test_per_task": 1,
    "data.test_per_task_overrides": "qqp=2",
    "run.rounds": 2,
    "train.local_steps": 1,
    "train.batch_size": 4,
    "eval.max_new_tokens": 2,
    "eval.round_samples": 1,
    "cluster.global_k": "4",
}

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "paper4").is_dir(), reason="needs ../shared/data")


def _tiny_bench(tmp, lines: list):
    """The quick profile's single scenario for three methods, shrunk to the tiny model and a few samples."""
    return bench.run_bench(
        "quick",
        out=tmp / "results",
        data_root=SHARED_DATA,
        runs_dir=tmp / "runs",
        methods=["zeroshot", "fedrouter", "fedsa"],
        scenarios=["single"],
        overrides=TINY,
        log=lines.append,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    lines = []
    path = _tiny_bench(tmp, lines)
    return tmp, path, lines


def test_records_carry_the_benchmark_keys(results):
    _tmp, path, _lines = results
    records = bench.read_records(path)
    # single feeds Table 3 only: generalization; fedrouter in both routing modes
    assert sorted((r["method"], r["eval_mode"], r.get("routing")) for r in records) == [
        ("fedrouter", "generalization", "global"),
        ("fedrouter", "generalization", "local"),
        ("fedsa", "generalization", None),
        ("zeroshot", "generalization", None),
    ]
    for record in records:
        assert set(REQUIRED) <= set(record), set(REQUIRED) - set(record)
        assert record["profile"] == "quick" and record["scenario"] == "single" and record["seed"] == 0
        rounds = 0 if record["method"] == "zeroshot" else 2  # zero-shot trains nothing
        assert len(record["round_s"]) == len(record["bytes_up_per_round"]) == len(record["rouge1_per_round"]) == rounds
        assert record["config"]["model.precision"] == "fp32" and record["config"]["eval.max_new_tokens"] == 2
        assert 0 <= record["rouge1"] <= 100 and 0 <= record["exact_match_qqp"] <= 100
        assert record["peak_rss_mb"] > 100 and 0 < record["peak_pss_mb"] <= record["peak_rss_mb"]
        assert record["compute_dtype"] == bench.resolved_dtype(record["config"]["model.precision"])
    fedsa = [r for r in records if r["method"] in ("fedsa", "zeroshot")]
    assert all(r["cluster_acc_local"] is None and r["routing_acc"] is None for r in fedsa)
    ours = [r for r in records if r["method"] == "fedrouter"]
    assert all(0 <= r["cluster_acc_global"] <= 1 for r in ours)
    assert all(len(r["rouge1_per_task"]) == 4 for r in records)  # the generalization set holds every task


def test_records_name_the_compute_dtype_the_machine_gives():
    assert bench.resolved_dtype("fp32") == "float32" and bench.resolved_dtype("bf16") == "bfloat16"
    # 'auto' takes bf16 only where the CPU computes it natively, and the machine string says which it is.
    native = ", AVX-512 BF16," in bench.machine()
    assert native != (", no AVX-512 BF16," in bench.machine())
    if not torch.cuda.is_available():  # on a GPU, 'auto' follows the GPU instead
        assert bench.resolved_dtype("auto") == ("bfloat16" if native else "float32")


def test_a_second_call_resumes_without_rerunning(results):
    tmp, path, _lines = results
    before = path.read_text()
    lines = []
    _tiny_bench(tmp, lines)
    assert path.read_text() == before
    assert all("already in" in line for line in lines)


def test_tables_and_plots_come_from_the_results_alone(results):
    tmp, path, _lines = results
    records = bench.read_records(path)
    written = write_report(records, tmp / "report", "paper4-raw-cpu-quick", "fedrouter bench --quick")
    names = {p.name for p in written}
    assert {"paper4-raw-cpu-quick.md", "silhouette.png", "clustering_accuracy.png"} <= names
    assert "rouge1_per_round.png" not in names  # the per-round check scores personalized samples: single has none
    assert all(p.stat().st_size > 0 for p in written)
    text = (tmp / "report" / "paper4-raw-cpu-quick.md").read_text()
    assert "Table 3" in text and "FedRouter (global routing)" in text and "FedSA" in text and "Zero-shot" in text
    # The tiny runs change the protocol's settings: every record and the report say so.
    assert all(r["overrides"] == dict(sorted(TINY.items())) for r in records)
    assert "**A variant of the protocol**" in text and '"model.name": "tiny-random"' in text
    result = gain(records, "single", "generalization")
    fedsa = next(r["rouge1"] for r in records if r["method"] == "fedsa" and r["eval_mode"] == "generalization")
    assert result["best_baseline"] == "fedsa" and result["baseline"] == pytest.approx(fedsa)
    assert result["missing"] == ["local", "fedit", "feddpa"]  # zero-shot is beside the baselines, not one of them
    assert "vs best client-personalized baseline (Local, FedDPA, FedSA)" in text


def test_the_report_is_remade_byte_for_byte(results):
    tmp, path, _lines = results
    records = bench.read_records(path)
    first = write_report(records, tmp / "again-1", "r", "fedrouter bench")
    second = write_report(records, tmp / "again-2", "r", "fedrouter bench")
    assert [p.name for p in first] == [p.name for p in second]
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_report_of_a_benchmark_where_fedrouter_has_not_run_a_scenario_yet(results):
    tmp, path, _lines = results
    records = bench.read_records(path)  # FedRouter and FedSA in single; FedSA has also run dual:
    records += [dict(r, scenario="dual", eval_mode="personalized") for r in records if r["method"] == "fedsa"]
    written = write_report(records, tmp / "partial", "paper4-raw-cpu-quick", "fedrouter bench --quick")
    assert "silhouette.png" in {p.name for p in written}
    text = (tmp / "partial" / "paper4-raw-cpu-quick.md").read_text()
    assert "| FedRouter (local routing) | – |" in text
    # Table 1 by task: FedSA's dual row holds its per-task scores, and their mean is the average column.
    by_task = text.split("## Table 1 by task")[1].split("## Table 3")[0]
    assert "**dual**" in by_task and "**all**" not in by_task
    fedsa = next(
        r for r in records if r["method"] == "fedsa" and r["scenario"] == "dual" and r["eval_mode"] == "personalized"
    )
    cells = " | ".join(f"{fedsa['rouge1_per_task'][t]:.1f}" for t in sorted(fedsa["rouge1_per_task"]))
    assert f"| FedSA | {cells} | {fedsa['rouge1']:.1f} |" in by_task


def _table_widths(markdown: str) -> list[set[int]]:
    """The cell counts of each Markdown table's lines (one set per table: one number when well formed)."""
    tables, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line.strip().strip("|").count("|") + 1)
        elif current:
            tables.append(set(current))
            current = []
    return tables


def test_report_of_the_many_task_run_alone_is_well_formed(results):
    tmp, path, _lines = results
    records = [
        dict(r, scenario="flan16-dual", eval_mode="personalized")
        for r in bench.read_records(path)
        if r["method"] == "fedsa"
    ]
    write_report(records, tmp / "flan16-only", "paper4-raw-cpu-quick", "fedrouter bench --quick")
    text = (tmp / "flan16-only" / "paper4-raw-cpu-quick.md").read_text()
    assert "No single-scenario (generalization) results yet." in text and "| method | flan16-dual |" in text
    widths = _table_widths(text)
    assert widths and all(len(w) == 1 for w in widths), widths


def test_cli_report_only_and_a_truncated_results_line(results, tmp_path):
    _tmp, path, _lines = results
    out = tmp_path / "out"
    out.mkdir()
    (out / "paper4-raw-cpu-quick.jsonl").write_text(path.read_text())
    command = [sys.executable, "-m", "fedrouter.cli", "bench", "--profile", "quick", "--report-only", "--out", str(out)]
    command += ["--data", str(tmp_path / "no-data")]  # no t-SNE here: it needs the real model
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "paper4-raw-cpu-quick.md").is_file()
    with (out / "paper4-raw-cpu-quick.jsonl").open("a") as handle:
        handle.write('{"method": "fedit", "sce')  # a crash mid-write
    with pytest.raises(ConfigError, match=r"paper4-raw-cpu-quick.jsonl:\d+: not a JSON record"):
        bench.read_records(out / "paper4-raw-cpu-quick.jsonl")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "not a JSON record" in done.stderr


def test_cli_bench_settings_are_validated_and_kept_out_of_the_standard_results(tmp_path):
    command = [sys.executable, "-m", "fedrouter.cli", "bench", "--report-only"]
    mixed = subprocess.run([*command, "cluster.global_k=16"], capture_output=True, text=True, cwd=tmp_path)
    assert mixed.returncode == 2 and "another --out" in mixed.stderr and "cluster.global_k" in mixed.stderr
    typo = subprocess.run([*command, "--out", "v", "cluster.globl_k=16"], capture_output=True, text=True, cwd=tmp_path)
    assert typo.returncode == 2 and "cluster.global_k" in typo.stderr  # the nearest valid key is suggested
    assert not (tmp_path / "benchmarks").exists()  # nothing was written


def test_commit_counts_code_changes_but_not_the_results_already_written(tmp_path, monkeypatch):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "paper4-cpu.jsonl").write_text("{}\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    monkeypatch.chdir(tmp_path)
    clean = bench.commit(Path("results"))
    assert clean and "+changes" not in clean and clean != "unknown"
    (tmp_path / "results" / "paper4-cpu.jsonl").write_text("{}\n{}\n")  # a run appended its records
    assert bench.commit(Path("results")) == clean and bench.commit(tmp_path / "results") == clean
    assert bench.commit() == clean + "+changes"  # without naming the results folder, any change counts
    (tmp_path / "code.py").write_text("x = 2\n")
    assert bench.commit(Path("results")) == clean + "+changes"
    assert bench.commit(Path("/elsewhere")) == clean + "+changes"  # a folder outside the repository


def test_profiles_match_the_committed_config():
    from fedrouter.config import load_config

    cfg = load_config(ROOT / "configs" / "paper4-raw-cpu.toml", {})
    for key, value in bench.PAPER4_RAW_CPU.items():
        assert cfg[key] == value, key
    assert cfg["data.source"].endswith("paper4-raw")
    assert json.dumps(bench.PROFILES["quick"].settings)  # plain values only


def test_no_profile_reads_a_task_label_to_answer():
    from fedrouter.config import Config

    for profile in bench.PROFILES.values():
        assert not any(
            "overrides" in key and value for key, value in profile.settings.items() if key.startswith("eval")
        )
    with pytest.raises(ConfigError, match="eval.max_new_tokens_overrides' was removed: it gave each test sample"):
        Config({"eval.max_new_tokens_overrides": "qqp=4"})


def test_retired_profile_and_results_of_another_commit_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="profile paper4-cpu is retired"):
        bench.run_bench("paper4-cpu", out=tmp_path, data_root=SHARED_DATA, runs_dir=tmp_path / "runs")
    path = tmp_path / "paper4-raw-cpu.jsonl"
    with pytest.raises(ConfigError, match=r"come from commit abc1234, this checkout is def5678.*worktree"):
        bench.check_one_commit(path, [{"commit": "abc1234"}], "def5678", standard=True)
    with pytest.raises(ConfigError, match="runs from a clean checkout"):
        bench.check_one_commit(path, [], "def5678+changes", standard=True)
    bench.check_one_commit(path, [{"commit": "def5678"}], "def5678", standard=True)
    bench.check_one_commit(path, [], "def5678+changes", standard=False)  # a variant or smoke run may be dirty


def test_cost_table_leaves_noted_runs_out_of_the_time_column():
    from fedrouter.bench.report import cost_table

    def record(seed, wall):
        return {"method": "fedit", "scenario": "single", "seed": seed, "wall_s": wall,
                "bytes_up_per_round": [2e6], "peak_rss_mb": 1024.0}  # fmt: skip

    note = {"scenario": "single", "seed": 1, "method": "fedit", "note": "paused for 40 minutes"}
    table = cost_table([record(0, 100.0), record(1, 5000.0)], [note])
    assert "| fedit | 100 | 1 | 2.00 | 1.0 |" in table
    assert "- fedit, single, seed 1: paused for 40 minutes" in table
    assert "| fedit | 2550 | 2 |" in cost_table([record(0, 100.0), record(1, 5000.0)])


def test_cost_table_keeps_wall_times_of_different_machines_apart():
    from fedrouter.bench.report import cost_table

    def record(seed, wall, machine):
        return {"method": "fedit", "scenario": "single", "seed": seed, "wall_s": wall, "machine": machine,
                "bytes_up_per_round": [2e6], "peak_rss_mb": 1024.0}  # fmt: skip

    table = cost_table([record(0, 100.0, "cpu A"), record(1, 300.0, "cpu B"), record(2, 200.0, "cpu A")])
    assert "| fedit | cpu A | 150 | 2 |" in table
    assert "| fedit | cpu B | 300 | 1 |" in table


def test_cost_table_keeps_the_many_task_run_apart_from_paper4():
    from fedrouter.bench.report import cost_table

    def record(scenario, wall, up):
        return {"method": "fedit", "scenario": scenario, "seed": 0, "wall_s": wall, "machine": "cpu A",
                "bytes_up_per_round": [up], "peak_rss_mb": 1024.0}  # fmt: skip

    records = [record("dual", 100.0, 8e6), record("all", 300.0, 8e6), record("flan16-dual", 900.0, 16e6)]
    table = cost_table(records)
    assert "| method | setting | wall s (mean) |" in table
    assert "| fedit | paper4 | 200 | 2 | 8.00 | 1.0 |" in table
    assert "| fedit | flan16-dual | 900 | 1 | 16.00 | 1.0 |" in table
    assert "setting" not in cost_table(records[:2])  # one setting: no column for it


def test_gain_compares_only_the_seeds_every_method_has():
    from fedrouter.bench.report import table1

    def record(method, seed, rouge1, routing=None):
        return {"method": method, "scenario": "dual", "eval_mode": "personalized", "seed": seed,
                "rouge1": rouge1, "routing": routing}  # fmt: skip

    # A benchmark half-way through seed 1: FedRouter has both seeds, FedIT only seed 0.
    records = [record("fedrouter", 0, 40.0, "local"), record("fedrouter", 1, 30.0, "local"), record("fedit", 0, 38.0)]
    result = gain(records, "dual", "personalized")
    assert result["seeds"] == [0] and result["partial"]
    assert result["fedrouter"] == pytest.approx(40.0) and result["absolute"] == pytest.approx(2.0)
    table = table1(records)
    assert "| FedIT | 38.0 (seed 0) |" in table and "| FedRouter (local routing) | 35.0 ± 5.0 |" in table
    assert "+2.0 (+5.3% vs fedit), on seed 0 (the seeds all have)" in table
    full = gain([*records, record("fedit", 1, 36.0)], "dual", "personalized")
    assert full["seeds"] == [0, 1] and not full["partial"] and full["absolute"] == pytest.approx(-2.0)
    # Tiny test models can score 0: the table then says so rather than printing "+nan%".
    zero = table1([record("fedrouter", 0, 1.5, "local"), record("fedit", 0, 0.0)])
    assert "+1.5 (vs fedit, which scores 0: no relative gain)" in zero and "nan" not in zero


@pytest.mark.parametrize(
    "folder, args",
    [
        ("", ["--profile", "paper4-cpu"]),  # v1, retired
        ("paper4-raw-cpu-9d1a341", []),  # v2 runs of an earlier commit
        ("", []),  # v2, from its frozen commit, as far as it has run
    ],
)
def test_committed_tables_remake_unchanged(tmp_path, folder, args):
    """The committed tables come from their JSONL alone, with today's report code (and today's method registry)."""
    import shutil

    results = ROOT / "benchmarks" / "results" / folder
    stem = "paper4-cpu" if args else "paper4-raw-cpu"
    for path in results.glob(f"{stem}*"):
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    command = [sys.executable, "-m", "fedrouter.cli", "bench", *args, "--report-only", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / f"{stem}.md").read_text() == (results / f"{stem}.md").read_text()
