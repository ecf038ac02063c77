"""LLaMA-Factory training YAMLs: recognised, every key mapped or reported, trained unchanged."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.config_llamafactory import convert, is_llamafactory, read_llamafactory
from tunelab.errors import ConfigError

from test_hub_models import REPO, V2, hf_home, offline_hub  # noqa: F401  (fixtures)

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
CONFIGS = FIXTURES / "train_lora"
runner = CliRunner()

# The keys of LLaMA-Factory's examples/train_lora/{llama3,qwen3}_lora_{sft,dpo,kto,pretrain,reward}.yaml
# (both versions of each stage together; commented-out keys are not keys).
COMMON = {"model_name_or_path", "trust_remote_code", "stage", "do_train", "finetuning_type", "lora_rank",
          "lora_target", "dataset", "cutoff_len", "max_samples", "overwrite_cache", "preprocessing_num_workers",
          "dataloader_num_workers", "output_dir", "logging_steps", "save_steps", "plot_loss", "overwrite_output_dir",
          "save_only_model", "report_to", "per_device_train_batch_size", "gradient_accumulation_steps",
          "learning_rate", "num_train_epochs", "lr_scheduler_type", "warmup_ratio", "bf16", "ddp_timeout",
          "resume_from_checkpoint"}
EVAL = {"val_size", "per_device_eval_batch_size", "eval_strategy", "eval_steps"}
EXAMPLE_KEYS = {
    "sft": COMMON | {"template"} | EVAL,
    "dpo": COMMON | {"template", "pref_beta", "pref_loss"},
    "kto": COMMON - {"save_only_model", "resume_from_checkpoint"} | {"template", "pref_beta"} | EVAL,
    "pretrain": COMMON,
    "reward": COMMON | {"template"},
}
# What the fixtures add: the fixture dataset_info.json, and dpo's commented eval block switched on.
ADDED = {"sft": {"dataset_dir"}, "dpo": {"dataset_dir", "eval_dataset", "per_device_eval_batch_size",
                                          "eval_strategy", "eval_steps"},
         "kto": {"dataset_dir"}, "pretrain": {"dataset_dir"}, "reward": {"dataset_dir"}}
IGNORED = {"overwrite_cache", "preprocessing_num_workers", "dataloader_num_workers", "plot_loss", "ddp_timeout",
           "report_to"}


def lf_tree(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"lora_{name}.yaml").read_text())


@pytest.mark.parametrize("name", list(EXAMPLE_KEYS))
def test_fixtures_hold_the_keys_of_the_llamafactory_examples(name):
    assert set(lf_tree(name)) == EXAMPLE_KEYS[name] | ADDED[name]


@pytest.mark.parametrize("name", list(EXAMPLE_KEYS))
def test_every_key_is_mapped_or_reported_as_ignored(name):
    tree = lf_tree(name)
    conversion = read_llamafactory(CONFIGS / f"lora_{name}.yaml")
    assert set(conversion.ignored) == IGNORED | ({"save_only_model", "per_device_eval_batch_size"} & set(tree))
    notice = conversion.notice()
    for key in conversion.ignored:
        assert notice.count(f"{key} (") == 1  # reported once, with the reason
    cfg = conversion.config()
    assert cfg.model.name_or_path == "TINY_MODEL" and cfg.model.trust_remote_code is True
    assert cfg.stage == {"sft": "sft", "dpo": "dpo", "kto": "kto", "pretrain": "pt", "reward": "rm"}[name]
    assert cfg.method.type == "lora" and cfg.method.r == 4 and cfg.method.target == "all-linear"
    assert cfg.method.alpha == 8  # LLaMA-Factory's default lora_alpha: 2 x lora_rank
    assert cfg.data.train == tree["dataset"].split(",")
    assert cfg.data.max_length == tree["cutoff_len"] and cfg.data.max_samples == 3
    assert cfg.data.dataset_dir == "tests/fixtures/llamafactory"
    assert cfg.train.batch_size == tree["per_device_train_batch_size"]
    assert cfg.train.grad_accum == tree["gradient_accumulation_steps"]
    assert cfg.train.lr == pytest.approx(tree["learning_rate"]) and cfg.train.epochs == 1.0
    assert cfg.train.scheduler == "cosine" and cfg.train.warmup_ratio == pytest.approx(0.1)
    assert cfg.train.precision == "bf16" and cfg.train.log_every == 1 and cfg.train.save_every == 2
    assert cfg.train.gradient_checkpointing is True  # on in LLaMA-Factory unless disable_gradient_checkpointing
    assert cfg.output_dir == tree["output_dir"]
    assert conversion.overwrite is True and conversion.resume is False


def test_stage_specific_keys():
    dpo = read_llamafactory(CONFIGS / "lora_dpo.yaml").config()
    assert (dpo.pref.beta, dpo.pref.loss) == (0.1, "sigmoid")
    assert dpo.data.eval == ["dpo_en_demo"] and dpo.data.eval_split == 0 and dpo.train.eval_every == 2
    kto = read_llamafactory(CONFIGS / "lora_kto.yaml").config()
    assert kto.pref.beta == 0.1 and kto.data.eval_split == 1
    assert kto.train.eval_every == 500  # eval_strategy: steps + eval_steps
    sft = read_llamafactory(CONFIGS / "lora_sft.yaml").config()
    assert sft.data.train == ["identity", "support_chat_demo"] and sft.data.eval_split == 1


def test_templates_map_to_a_tunelab_template_or_the_tokenizers_own():
    assert read_llamafactory(CONFIGS / "lora_reward.yaml").config().data.template == "llama3"
    assert read_llamafactory(CONFIGS / "lora_dpo.yaml").config().data.template == "chatml"
    kto = read_llamafactory(CONFIGS / "lora_kto.yaml")
    assert kto.config().data.template == "auto"
    assert "template 'qwen3_nothink': the tokenizer's own chat template" in kto.notice()
    with pytest.raises(ConfigError, match="template 'empty' has no tunelab equivalent.*remove the key"):
        convert({**lf_tree("sft"), "template": "empty"}, "lf.yaml")


def test_absent_keys_take_llamafactory_defaults():
    cfg = convert({"model_name_or_path": "m", "dataset": "identity", "lora_rank": 16}).config()
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (3.0, 8, 5e-5)
    assert cfg.train.scheduler == "linear" and cfg.data.max_length == 2048
    assert cfg.method.type == "lora" and cfg.method.alpha == 32 and cfg.train.precision == "fp32"


def test_value_conversions():
    cfg = convert({"model_name_or_path": "m", "finetuning_type": "lora", "quantization_bit": 4,
                   "lora_target": "q_proj, v_proj", "lora_alpha": 8, "adam_beta2": 0.95, "optim": "adamw_torch",
                   "lr_scheduler_type": "constant_with_warmup", "disable_gradient_checkpointing": True,
                   "max_steps": -1, "fp16": True, "flash_attn": "fa2", "neat_packing": True}).config()
    assert cfg.method.type == "qlora" and cfg.model.quantization == "4bit"
    assert cfg.method.target == ["q_proj", "v_proj"] and cfg.method.alpha == 8
    assert cfg.train.adam_betas == (0.9, 0.95) and cfg.train.optimizer == "adamw"
    assert cfg.train.scheduler == "constant" and cfg.train.gradient_checkpointing is False
    assert cfg.train.max_steps is None and cfg.train.precision == "fp16"
    assert cfg.model.attn_implementation == "flash_attention_2" and cfg.data.packing is True
    freeze = convert({"model_name_or_path": "m", "finetuning_type": "freeze", "freeze_trainable_layers": 1,
                      "freeze_extra_modules": "norm,lm_head"}).config()
    assert freeze.method.type == "freeze" and freeze.method.trainable_layers == 1
    assert freeze.method.trainable_modules == ["norm", "lm_head"]


def test_unknown_and_unsupported_keys_are_errors():
    with pytest.raises(ConfigError, match=r"lf\.yaml: neftune_noise_alpha, mystery are not LLaMA-Factory training"):
        convert({"model_name_or_path": "m", "neftune_noise_alpha": 5, "mystery": 1}, "lf.yaml")
    with pytest.raises(ConfigError, match="finetuning_type 'oft' has no tunelab equivalent"):
        convert({"model_name_or_path": "m", "finetuning_type": "oft"}, "lf.yaml")
    with pytest.raises(ConfigError, match="do_train is false"):
        convert({"model_name_or_path": "m", "do_train": False}, "lf.yaml")
    with pytest.raises(ConfigError, match=r"key 'train\.scheduler' = 'polynomial'"):
        convert({"model_name_or_path": "m", "lr_scheduler_type": "polynomial"}, "lf.yaml").config()


def test_recognition():
    assert is_llamafactory(lf_tree("sft"))
    assert not is_llamafactory({"model": {"name_or_path": "m"}, "stage": "sft"})
    assert not is_llamafactory({"stage": "sft", "output_dir": "x"})  # tunelab keys only: a tunelab file


def test_config_convert_prints_an_equivalent_tunelab_yaml(tmp_path):
    result = runner.invoke(app, ["config", "convert", str(CONFIGS / "lora_dpo.yaml")])
    assert result.exit_code == 0, result.output
    assert "# ignored: overwrite_cache (" in result.output and "--overwrite" in result.output
    converted = tmp_path / "dpo.yaml"
    converted.write_text(result.output)
    assert load_config(converted) == read_llamafactory(CONFIGS / "lora_dpo.yaml").config()
    not_lf = runner.invoke(app, ["config", "convert", str(converted)])
    assert not_lf.exit_code == 2 and "is not a LLaMA-Factory training YAML" in not_lf.output


def test_train_runs_the_sft_example_unchanged(tiny_model_dir, tmp_path):
    tree = {**lf_tree("sft"), "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(FIXTURES),
            "output_dir": str(tmp_path / "run")}
    config = tmp_path / "llama3_lora_sft.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "leftover.txt").write_text("x")  # overwrite_output_dir: true lets the run start here
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert result.output.count("Ignored, no effect in tunelab: overwrite_cache (") == 1
    assert "done: 3 steps" in result.output
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == {"type": "lora", "init_from": None, "target": "all-linear", "modules_to_save": [],
                               "alpha": 8.0, "dropout": 0.0, "r": 4, "use_dora": False, "use_rslora": False,
                               "init": "default", "loraplus_lr_ratio": None}
    assert saved["data"]["train"] == ["identity", "support_chat_demo"] and saved["data"]["template"] == "auto"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert any("eval_loss" in r for r in rows)  # val_size 1 held out, evaluated every 2 steps



@pytest.mark.parametrize("name, stage", [("dpo", "dpo"), ("kto", "kto"), ("pretrain", "pt"), ("reward", "rm")])
def test_train_runs_the_other_examples_unchanged(name, stage, tiny_model_dir, tmp_path):
    """Every other train_lora example trains as written: only the model, the paths and the template
    differ (the tiny test tokenizer has ChatML's special tokens, not Llama 3's or Qwen 3's)."""
    tree = {**lf_tree(name), "model_name_or_path": str(tiny_model_dir), "dataset_dir": str(FIXTURES),
            "output_dir": str(tmp_path / "run"), "template": "chatml"}
    config = tmp_path / f"lora_{name}.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    result = runner.invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["stage"] == stage
    losses = [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    assert losses and all(loss == loss for loss in losses)  # logged every step, never NaN
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == tree["lora_rank"]

# The model keys of LLaMA-Factory's examples/train_qlora/qwen3_lora_sft_{otfq,bnb_npu}.yaml beyond train_lora's,
# and model_revision (its ModelArguments: a branch, tag or commit; default "main").
QLORA_KEYS = {"quantization_bit": 4, "quantization_method": "bnb", "double_quantization": False}


def test_model_revision_and_the_qlora_example_model_keys_map_onto_model():
    tree = {**lf_tree("sft"), **QLORA_KEYS, "model_revision": "v2"}
    conversion = convert(tree, "lf.yaml")
    cfg = conversion.config()
    assert cfg.model.revision == "v2" and cfg.model.quantization == "4bit" and cfg.model.double_quant is False
    assert cfg.method.type == "qlora"
    assert "model_revision" not in conversion.ignored and "revision: v2" in conversion.to_yaml()
    main = convert({"model_name_or_path": str(FIXTURES), "model_revision": "main"}).config()
    assert main.model.revision is None  # LLaMA-Factory's default; also right for a local model
    with pytest.raises(ConfigError, match=r"lf\.yaml: quantization_method 'hqq' is not supported.*bitsandbytes"):
        convert({**tree, "quantization_method": "hqq"}, "lf.yaml")


def test_model_loading_keys_without_effect_are_reported_and_the_token_never_printed():
    secret = "hf_not_a_real_token"
    conversion = convert({"model_name_or_path": "m", "cache_dir": "/models", "hf_hub_token": secret,
                          "low_cpu_mem_usage": True, "print_param_status": True}, "lf.yaml")
    assert {"cache_dir", "hf_hub_token", "low_cpu_mem_usage", "print_param_status"} <= set(conversion.ignored)
    assert "HF_HUB_CACHE" in conversion.ignored["cache_dir"] and "HF_TOKEN" in conversion.ignored["hf_hub_token"]
    assert secret not in conversion.notice() + conversion.to_yaml()


def test_model_revision_selects_the_hub_snapshot(offline_hub):
    from tunelab.models.loader import model_directory

    cfg = convert({"model_name_or_path": REPO, "model_revision": "v2", "dataset": "identity"}).config()
    assert model_directory(cfg.model) == offline_hub / "hub" / "models--tunelab-test--tiny-llama" / "snapshots" / V2
