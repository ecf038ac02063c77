"""benchmarks/profile_step.py puts every operator of a step in the group the README reports;
benchmarks/speed.py judges every variant against the fp32 reference and issue 18's targets."""

import importlib.util
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tunelab.models.forward import hidden_states
from tunelab.train.losses import causal_lm_loss

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (profile_step imports speed by name)."""
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def _profiled_step(model, vocab: int):
    """One tiny training step with the phases labelled as profile_step labels them."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        with record_function("tunelab.data"):
            ids = torch.randint(0, vocab, (2, 24))
            batch = {"input_ids": ids, "labels": ids.clone()}
        hidden, head = hidden_states(model, batch)
        loss, _ = causal_lm_loss(hidden, head, batch["labels"], chunk_size=0)
        loss.backward()
        with record_function("tunelab.optimizer"):
            optimizer.step()
            optimizer.zero_grad()
    return prof


def test_breakdown_puts_each_kind_of_work_in_its_group(model, tokenizer):
    ps = _benchmark_module("profile_step")
    vocab = len(tokenizer)
    prof = _profiled_step(model, vocab)
    covered = sum(e.self_cpu_time_total for e in prof.events() if not e.name.startswith(("tunelab.", "ProfilerStep")))
    table = ps.breakdown(prof, wall_us=covered + 5000.0, steps=1, vocab=vocab)
    assert set(table) == set(ps.GROUPS)
    for group in ("matmuls", "attention", "elementwise", "loss", "optimizer", "data"):
        assert table[group] > 0, group
    assert table["compiled graphs"] == 0
    # whatever no operator covers is the Python overhead: the groups add up to the wall time
    assert abs(sum(table.values()) - (covered + 5000.0) / 1e3) < 1e-6
    assert abs(table["Python overhead"] - 5.0) < 1e-6


def test_matmuls_split_into_lm_head_lora_and_decoder(tokenizer):
    ps = _benchmark_module("profile_step")
    vocab = len(tokenizer)
    rows, head = torch.randn(6, 64), torch.randn(vocab, 64)
    decoder, lora_a = torch.randn(64, 128), torch.randn(64, 8)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        rows @ head.t()
        rows @ decoder
        rows @ lora_a
    groups = {}
    for event in prof.events():
        if event.name == "aten::mm":
            groups[tuple(tuple(s) for s in event.input_shapes)] = ps.classify(event, vocab, rank=8)
    assert groups == {((6, 64), (64, vocab)): "loss", ((6, 64), (64, 128)): "matmuls",
                      ((6, 64), (64, 8)): "LoRA matmuls"}


def _result(tokens_per_s: float, peak_gb: float, final_loss: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "peak_rss_bytes": peak_gb * 1e9, "final_loss": final_loss,
            "mean_loss": final_loss, "steps": 10, "train_s": 5.0, "loadavg": [1.0, 1.0],
            "matmul_params": 1000, "trainable_params": 10}


def test_every_variant_is_judged_against_the_fp32_reference():
    speed = _benchmark_module("speed")
    results = {"tunelab": _result(850, 2.0, 2.019), "tunelab_eager_attn": _result(900, 4.2, 2.05),
               "tunelab_fp32_unpacked": _result(300, 4.5, 2.00)}
    summary = speed.summarise(results, peak=1.6e7)  # tunelab at 21% MFU, eager attention at 23%
    assert abs(results["tunelab"]["loss_rel_diff"]["final_loss"] - 0.0095) < 1e-9
    assert abs(results["tunelab_eager_attn"]["loss_rel_diff"]["final_loss"] - 0.025) < 1e-9
    assert abs(results["tunelab"]["mfu"] - (4 * 1000 + 2 * 10) * 850 / 1.6e7) < 1e-12
    text = speed.markdown(summary, "cmd")
    assert "at 100% MFU the LoRA job would run at 3980 real tokens/s" in text  # 1.6e7 / (4 x 1000 + 2 x 10)
    assert "Targets for tunelab: >= 800 tokens/s, MFU >= 20%, peak RSS <= 2.1 GB, final loss within 1% of " \
           "tunelab_fp32_unpacked: met, met, met, met." in text
    assert "Targets for tunelab_eager_attn: >= 800 tokens/s, MFU >= 20%, peak RSS <= 2.1 GB, final loss within " \
           "1% of tunelab_fp32_unpacked: met, met, NOT met, NOT met." in text
    assert "Targets for tunelab_fp32_unpacked" not in text
    assert "| tunelab_eager_attn | 900 | 4.20 GB |" in text and "| 2.50% |" in text
