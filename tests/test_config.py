"""Run configuration: validation, overrides, error messages, round trip."""

import pytest

from tunelab.config import build_config, load_config, load_run_config, save_config
from tunelab.errors import ConfigError


def test_defaults_use_embedded_model_and_lora():
    cfg = build_config({})
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.method.type == "lora" and cfg.stage == "sft"


def test_overrides_are_parsed_as_yaml_values():
    cfg = build_config({"train": {"lr": 1e-3}}, ["train.lr=1e-4", "method.r=16", "data.train=[a, b]",
                                                 "train.gradient_checkpointing=true"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.r == 16
    assert cfg.data.train == ["a", "b"]
    assert cfg.train.gradient_checkpointing is True


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.warmup_ration'.*Did you mean 'train\.warmup_ratio'"):
        build_config({"train": {"warmup_ration": 0.1}})
    with pytest.raises(ConfigError, match=r"'train\.lr_rate'.*Did you mean 'train\.lr'"):
        build_config({}, ["train.lr_rate=1"])


def test_key_in_wrong_section_points_to_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'model\.lr'.*Did you mean 'train\.lr'"):
        build_config({"model": {"lr": 1e-4}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"key 'train\.batch_size' = 'many'.*expected int"):
        build_config({"train": {"batch_size": "many"}})
    with pytest.raises(ConfigError, match=r"key 'train\.scheduler'.*one of 'linear', 'cosine', 'constant'"):
        build_config({}, ["train.scheduler=exponential"])


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="has no '='"):
        build_config({}, ["train.lr"])


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  name_or_path: x\n train: [\n")
    with pytest.raises(ConfigError, match=r"run\.yaml line \d+"):
        load_config(bad)


def test_missing_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = build_config({"method": {"type": "dora", "target": ["q_proj", "v_proj"]}, "output_dir": str(tmp_path)},
                       ["train.max_steps=5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_run_config(tmp_path)
    assert again == cfg


def test_run_config_missing_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="not a tunelab run directory"):
        load_run_config(tmp_path)


def test_qlora_loads_the_base_in_4bit_unless_told_otherwise():
    assert build_config({"method": {"type": "qlora"}}).model.quantization == "4bit"
    assert build_config({"method": {"type": "qlora"}, "model": {"quantization": "8bit"}}).model.quantization == "8bit"
    assert build_config({"method": {"type": "lora"}}).model.quantization == "none"
