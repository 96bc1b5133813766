from pathlib import Path

import pytest

from fedrouter.config import Config, ConfigError, load_config, parse_overrides


def test_defaults_are_valid_and_complete():
    cfg = Config()
    assert cfg["run.rounds"] >= 1
    assert cfg.list("lora.target_modules") == ["q_proj", "v_proj"]


def test_unknown_setting_names_it_and_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown setting 'train.lrr'.*did you mean 'train.lr'"):
        Config({"train.lrr": 0.1})


def test_bare_field_name_suggests_dotted_key():
    with pytest.raises(ConfigError, match=r"'rounds'.*did you mean 'run.rounds'"):
        Config({"rounds": 2})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("run.rounds", "two", r"'run.rounds' expects int"),
        ("run.rounds", -1, r"'run.rounds' must be at least 0"),
        ("data.scenario", "triple", r"'data.scenario' must be one of"),
        ("lora.dropout", 1.5, r"'lora.dropout' must be between"),
        ("cluster.local_k", "0", r"'cluster.local_k' must be 'auto' or a whole number"),
        ("eval.sets", "personalised", r"did you mean 'personalized'"),
        ("data.test_per_task_overrides", "qqp:4", r"expects 'task=number'"),
        ("train.lr", float("nan"), r"finite number, got nan"),
        ("run.reply_timeout_s", float("inf"), r"finite number, got inf"),
        ("cluster.embed_scale", "zscore", r"'cluster.embed_scale' must be one of"),
        ("cluster.embed_depth", 1.5, r"'cluster.embed_depth' must be between"),
        ("cluster.global_method", "hdbscan", r"'cluster.global_method' must be one of"),
        ("cluster.global_threshold", 0.0, r"'cluster.global_threshold' must be between"),
    ],
)
def test_bad_values_name_the_setting(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config({key: value})


def test_strings_from_the_command_line_are_coerced():
    cfg = Config({"run.rounds": "4", "train.lr": "1e-3", "cluster.local_k": 3})
    assert cfg["run.rounds"] == 4 and cfg["train.lr"] == 1e-3 and cfg["cluster.local_k"] == "3"


def test_toml_file_round_trip_and_precedence(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text("[run]\nrounds = 5\n[train]\nlr = 0.001\n")
    cfg = load_config(path, parse_overrides(["run.rounds=7"]))
    assert cfg["run.rounds"] == 7 and cfg["train.lr"] == 0.001
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


def test_toml_errors_name_the_file(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nrounds = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: invalid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=r"config file .*unknown.toml: unknown setting 'train.steps'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.toml")


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["run.rounds"])
