"""`tunelab compare`: same job per method, one failure reported, the others still run."""

import json
from pathlib import Path

import yaml

from tunelab.compare import compare

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"


def test_compare_tabulates_each_method_and_reports_failures(tiny_model_dir, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"dataset_dir": str(FIXTURES), "train": ["identity", "support_chat_demo"], "eval_split": 2,
                 "max_length": 96},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "precision": "fp32"},
    }))
    results = compare(config, [], ["lora", "freeze", "ia3"], tmp_path / "out",
                      ["freeze:method.trainable_layers=99"], echo=lambda *_: None)

    rows = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "freeze", "ia3"] == [r.method for r in results]
    lora, freeze, ia3 = rows
    assert freeze["error"] and "trainable_layers" in freeze["error"]
    for ok in (lora, ia3):
        assert ok["error"] is None
        assert 0 < ok["trainable_params"] < ok["total_params"]
        assert ok["peak_memory_bytes"] > 0 and ok["tokens_per_s"] > 0
        assert ok["eval_loss"] is not None and ok["base_eval_loss"] is not None
        assert ok["mergeable"] is True
    # LoRA starts from the base exactly, so its base eval equals the one IA3 sees with IA3 switched off.
    assert abs(lora["base_eval_loss"] - ia3["base_eval_loss"]) < 1e-5
    assert lora["trainable_params"] != ia3["trainable_params"]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| lora |" in table and "| freeze |" in table and "trainable_layers" in table
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
