"""Method configuration per type: the registry supplies the types, keys of other types are errors."""

import pytest
import yaml
from pydantic import Field, ValidationError

from tunelab.config import (MethodConfig, build_config, describe_keys, load_config,
                            method_config_classes, save_config)
from tunelab.errors import ConfigError
from tunelab.runs import RunDir
from tunelab.methods.base import METHODS, Method, register
from tunelab.methods.bottleneck import BottleneckConfig, FusionConfig, MixAndMatchConfig
from tunelab.methods.freeze import FreezeConfig
from tunelab.methods.lora import AdaLoraMethodConfig, IA3MethodConfig, LoraMethodConfig
from tunelab.methods.prompts import (NEUTRAL_INIT_TEXT, KeyValuePrefixConfig, PrefixConfig, PromptConfig,
                                     PTuningConfig)

# The flat method section every run directory got before per-type configs (tunelab <= the
# previous release): every key of every type, most at their defaults.
OLD_FLAT_METHOD = {
    "type": "lora", "init_from": None, "r": 16, "alpha": 32.0, "dropout": 0.0, "target": "all-linear",
    "modules_to_save": [], "use_dora": False, "use_rslora": False, "init": "default", "loraplus_lr_ratio": None,
    "init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "feedforward_modules": None,
    "trainable_layers": 2, "trainable_modules": [], "num_virtual_tokens": 20, "prefix_projection": False,
    "encoder_hidden_size": None, "encoder_type": "mlp", "prompt_init_text": None, "reduction_factor": 16,
    "non_linearity": "relu", "scaling": 1.0, "drop_layers": 0, "drop_at": "both", "fusion_adapters": [],
}


def test_every_registered_type_has_the_config_class_declared_beside_it():
    classes = method_config_classes()
    assert set(classes) == set(METHODS)
    expected = {"lora": LoraMethodConfig, "dora": LoraMethodConfig, "qlora": LoraMethodConfig,
                "adalora": AdaLoraMethodConfig, "ia3": IA3MethodConfig, "prefix": PrefixConfig,
                "ptuning_v2": KeyValuePrefixConfig, "prompt": PromptConfig, "ptuning": PTuningConfig,
                "houlsby": BottleneckConfig, "mam": MixAndMatchConfig, "adapter_fusion": FusionConfig,
                "freeze": FreezeConfig, "full": MethodConfig}
    assert {name: classes[name] for name in expected} == expected
    # families share fields through their base classes, not copies
    assert set(LoraMethodConfig.model_fields) & set(AdaLoraMethodConfig.model_fields) == \
        {"type", "init_from", "target", "modules_to_save", "alpha", "dropout"}
    assert set(MixAndMatchConfig.model_fields) == set(BottleneckConfig.model_fields) | set(PrefixConfig.model_fields)
    assert set(MethodConfig.model_fields) == {"type", "init_from"}


def test_yaml_key_of_another_type_names_the_type_and_its_keys(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("method:\n  type: houlsby\n  r: 16\n")
    with pytest.raises(ConfigError) as err:
        load_config(run)
    message = str(err.value)
    assert message.startswith(f"{run}: key 'method.r' does not apply to method.type 'houlsby' (it is a key of lora")
    assert ("Method type 'houlsby' takes: type, init_from, drop_layers, drop_at, reduction_factor, non_linearity, "
            "scaling.") in message
    assert "\n" not in message


def test_unknown_method_key_gets_hint_and_the_types_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'method\.lora_rank' for method\.type 'dora'\. Did you mean "
                                          r"'method\.r'\?.*Method type 'dora' takes: type, init_from, target"):
        build_config({"method": {"type": "dora", "lora_rank": 4}})


def test_unknown_type_is_reported_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"key 'method\.type' = 'lorra' is invalid: 'lorra' is not a method type\. "
                                          r"Did you mean 'lora'\? Known types: adalora, adapter_fusion, dora"):
        build_config({}, ["method.type=lorra"])


def test_wrong_value_names_the_type_specific_expected_type():
    with pytest.raises(ConfigError, match=r"key 'method\.encoder_type' = 'gru'.*expected one of 'mlp', 'lstm'"):
        build_config({"method": {"type": "ptuning", "encoder_type": "gru"}})
    cfg = build_config({"method": {"type": "lora"}})
    with pytest.raises(ValidationError):
        cfg.method.r = 0  # re-validated on assignment, with the type's own constraints


def test_switching_type_by_override_drops_the_files_keys_but_checks_later_ones():
    tree = {"method": {"type": "lora", "r": 4, "alpha": 8, "target": ["q_proj"]}}
    ia3 = build_config(tree, ["method.type=ia3"])
    assert isinstance(ia3.method, IA3MethodConfig) and ia3.method.target == ["q_proj"]
    full = build_config(tree, ["method.type=full"])
    assert type(full.method) is MethodConfig and full.method.type == "full"
    with pytest.raises(ConfigError, match=r"'method\.r' does not apply to method\.type 'ia3'"):
        build_config(tree, ["method.type=ia3", "method.r=8"])
    # what `compare` does: settings for all methods first, then each type; a key for others is dropped
    prefix = build_config(tree, ["method.num_virtual_tokens=5", "method.type=prefix"])
    assert prefix.method.num_virtual_tokens == 5
    assert not hasattr(build_config(tree, ["method.num_virtual_tokens=5", "method.type=lora"]).method,
                       "num_virtual_tokens")
    with pytest.raises(ConfigError, match=r"'method\.num_virtual_tokens' does not apply to method\.type 'lora'"):
        build_config(tree, ["method.num_virtual_tokens=5"])


def test_base_class_call_builds_the_types_config():
    houlsby = MethodConfig(type="houlsby", reduction_factor=4, num_virtual_tokens=3)
    assert type(houlsby) is BottleneckConfig and houlsby.reduction_factor == 4
    mam = MethodConfig(type="mam", reduction_factor=4, num_virtual_tokens=3)
    assert type(mam) is MixAndMatchConfig and mam.num_virtual_tokens == 3
    assert type(MethodConfig()) is LoraMethodConfig  # lora is the default type
    with pytest.raises(ValidationError, match="configured by IA3MethodConfig"):
        LoraMethodConfig(type="ia3")
    with pytest.raises(ValidationError):
        BottleneckConfig(type="houlsby", num_virtual_tokens=3)  # the per-type classes are strict


def test_saved_config_has_only_the_types_keys_and_round_trips(tmp_path):
    cfg = build_config({"method": {"type": "prefix", "num_virtual_tokens": 7}, "output_dir": str(tmp_path)})
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["method"] == {"type": "prefix", "init_from": None, "num_virtual_tokens": 7,
                               "prefix_projection": True, "encoder_hidden_size": None,
                               "prompt_init_text": NEUTRAL_INIT_TEXT}
    assert RunDir(tmp_path).read_config() == cfg


def test_run_configs_saved_before_per_type_methods_still_load(tmp_path):
    old = build_config({"output_dir": str(tmp_path)}).model_dump(mode="json")
    old["method"] = OLD_FLAT_METHOD
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = RunDir(tmp_path).read_config()
    assert isinstance(cfg.method, LoraMethodConfig) and (cfg.method.r, cfg.method.alpha) == (16, 32.0)
    for type_, cls in [("houlsby", BottleneckConfig), ("freeze", FreezeConfig), ("full", MethodConfig)]:
        old["method"] = {**OLD_FLAT_METHOD, "type": type_}
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
        assert type(RunDir(tmp_path).read_config().method) is cls
    with pytest.raises(ConfigError, match="does not apply"):  # a hand-written file stays strict
        load_config(tmp_path / "config.yaml")


class ToyConfig(MethodConfig):
    """A method's keys, declared beside it."""

    sharpness: float = Field(1.0, gt=0, description="How sharp the toy is.")


@pytest.fixture
def toy_method():
    """A method added the documented way: a class with its config, and one register line."""
    @register("toy")
    class Toy(Method):
        config_class = ToyConfig

    yield Toy
    del METHODS["toy"]


def test_a_new_method_is_one_class_and_one_register_line(toy_method):
    # train.lr: auto needs a measured rate per method family (tunelab.method_defaults.LR_FAMILY),
    # so a new method names its learning rate until it is measured.
    cfg = build_config({"method": {"type": "toy", "sharpness": 2.5}, "train": {"lr": 1e-3}})
    assert type(cfg.method) is ToyConfig and cfg.method.sharpness == 2.5
    with pytest.raises(ConfigError, match=r"'method\.r' does not apply to method\.type 'toy'.*takes: type, init_from, "
                                          r"sharpness\."):
        build_config({"method": {"type": "toy", "r": 4}, "train": {"lr": 1e-3}})
    groups = {group.title: group for group in describe_keys("toy")}
    assert [doc.key for doc in groups["method: type toy"].keys] == ["method.sharpness"]
    assert groups["method: type toy"].keys[0].help == "How sharp the toy is."
