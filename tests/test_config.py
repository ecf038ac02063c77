"""Run configuration: validation, overrides, error messages, round trip."""

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import build_config, describe_keys, load_config, save_config
from tunelab.errors import ConfigError
from tunelab.runs import RunDir

runner = CliRunner()


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


def test_a_bad_value_for_a_union_names_the_key_once_with_each_members_reason():
    """bool-or-auto keys: pydantic reports each union member at ``key.<member>``; the user sees the key."""
    with pytest.raises(ConfigError) as raised:
        build_config({}, ["data.packing=maybe", "train.lr=-1", "data.train=[1]"])
    text = str(raised.value)
    assert ("key 'data.packing' = 'maybe' is invalid: Input should be a valid boolean, unable to interpret input; "
            "or Input should be 'auto' (expected bool or auto).") in text
    assert "key 'train.lr' = -1 is invalid: Input should be greater than 0; or Input should be 'auto'" in text
    assert "key 'data.train.0' = 1 is invalid: Input should be a valid string" in text  # list positions stay
    assert text.count("data.packing") == 1 and "literal[" not in text and ".bool'" not in text


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
    again = RunDir(tmp_path).read_config()
    assert again == cfg


def test_run_config_missing_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="not a tunelab run directory"):
        RunDir(tmp_path).read_config()


def test_qlora_loads_the_base_in_4bit_unless_told_otherwise():
    assert build_config({"method": {"type": "qlora"}}).model.quantization == "4bit"
    assert build_config({"method": {"type": "qlora"}, "model": {"quantization": "8bit"}}).model.quantization == "8bit"
    assert build_config({"method": {"type": "lora"}}).model.quantization == "none"


@pytest.mark.parametrize("tree, hint", [
    ({"learning_rate": 1e-4}, "Did you mean 'train.lr'? ('learning_rate' is the LLaMA-Factory / Hugging Face name.)"),
    ({"train": {"gradient_accumulation_steps": 4}}, "Did you mean 'train.grad_accum'?"),
    ({"train": {"per_device_train_batch_size": 2}}, "Did you mean 'train.batch_size'?"),
    ({"num_train_epochs": 3}, "Did you mean 'train.epochs'?"),
    ({"method": {"lora_rank": 8}}, "Did you mean 'method.r'?"),
    ({"method": {"lora_alpha": 16}}, "Did you mean 'method.alpha'?"),
    ({"method": {"lora_target": "all"}}, "Did you mean 'method.target'?"),
    ({"data": {"cutoff_len": 512}}, "Did you mean 'data.max_length'?"),
    ({"finetuning_type": "lora"}, "Did you mean 'method.type'?"),
    ({"train": {"lr_scheduler_type": "cosine"}}, "Did you mean 'train.scheduler'?"),
    ({"bf16": True}, "Did you mean 'train.precision: bf16'?"),
    ({"train": {"output_dir": "x"}}, "Did you mean 'output_dir'?"),
    ({"overwrite_output_dir": True}, "Did you mean `tunelab train --overwrite`?"),
])
def test_foreign_key_names_get_the_tunelab_name(tree, hint):
    with pytest.raises(ConfigError) as err:
        build_config(tree)
    assert hint in str(err.value)


def test_difflib_remains_the_fallback_for_typos():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.gradient_acum'.*Did you mean 'train\.grad_accum'"):
        build_config({"train": {"gradient_acum": 2}})


def test_every_key_has_a_one_line_description():
    docs = [doc for group in describe_keys() for doc in group.keys]
    assert {doc.key for doc in docs} >= {"train.lr", "method.r", "method.num_virtual_tokens", "method.fusion_adapters",
                                        "stage", "output_dir"}
    for doc in docs:
        assert doc.help and "\n" not in doc.help, doc.key


def test_config_keys_prints_type_default_and_help_per_section():
    out = runner.invoke(app, ["config-keys"]).output
    assert "\ntrain: The optimisation" in out
    lr = out[out.index("  train.lr "):].splitlines()
    assert lr[0].split() == ["train.lr", "float", "or", "auto", "=", "auto"]
    assert lr[1].strip().startswith("Peak learning rate")
    assert "method: type houlsby, pfeiffer, parallel" in out and "method.r " in out
    lora = runner.invoke(app, ["config-keys", "--method", "lora"]).output
    assert "method: type lora, dora, rslora, pissa, loraplus, qlora" in lora
    assert "method.r " in lora and "method.num_virtual_tokens" not in lora and "method.init_from" in lora
    sft = runner.invoke(app, ["config-keys", "--stage", "sft"]).output
    assert "\npref:" not in sft and "\nppo:" not in sft and "\ntrain:" in sft
    assert "\npref:" in runner.invoke(app, ["config-keys", "--stage", "dpo"]).output
    bad = runner.invoke(app, ["config-keys", "--method", "lorra"])
    assert bad.exit_code == 2 and "Did you mean 'lora'" in bad.output
