"""Run-time choices: precision and batch layout follow the hardware and the attention kernel."""

import pytest

from tunelab.train.runtime import packing_enabled, resolve_precision


@pytest.mark.parametrize("setting, attention, supports, expected", [
    ("auto", "sdpa", True, False),  # block mask would force materialised attention: pad instead
    ("auto", "flash_attention_2", True, True),  # varlen kernels: packing is padding-free and cheap
    (True, "sdpa", True, True),
    (False, "flash_attention_2", True, False),
    (True, "flash_attention_2", False, False),  # prompt learning cannot pack
])
def test_packing_follows_the_attention_kernel(setting, attention, supports, expected):
    assert packing_enabled(setting, attention, supports) is expected


def test_explicit_precision_is_kept():
    assert resolve_precision("fp32") == "no"
    assert resolve_precision("bf16") == "bf16"


@pytest.mark.parametrize("bf16_units, expected", [(True, "bf16"), (False, "no")])
def test_auto_precision_on_cpu_uses_bf16_only_with_bf16_units(monkeypatch, bf16_units, expected):
    import torch

    from tunelab.train import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "cpu_has_bf16_units", lambda: bf16_units)
    assert resolve_precision("auto") == expected
