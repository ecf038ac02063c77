"""Bottleneck adapters: Houlsby, Pfeiffer, parallel, MAM, AdapterFusion, AdapterDrop."""

import json

import pytest
import torch
from torch import nn

from tunelab.config import MethodConfig
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.bottleneck import AdapterFusion, BottleneckAdapter, MixAndMatch
from tunelab.methods.bottleneck_layout import find_attached
from tunelab.methods.bottleneck_modules import Fusion
from tunelab.testing.tiny import tiny_llama
from tunelab.virtual_tokens import generation_target

TYPES = ["houlsby", "pfeiffer", "parallel", "mam"]
ADAPTER_PREFIXES = ("tunelab_adapters.", "base_model.tunelab_adapters.", "prompt_encoder.")


def make_method(type_, **overrides):
    return get_method(MethodConfig(type=type_, reduction_factor=4, num_virtual_tokens=3, **overrides))


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tokenizer(["Who are you? I am Tuna.", "The capital of France is Paris."], return_tensors="pt",
                     padding=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def loss(model, batch):
    with torch.no_grad():
        return model(**batch, labels=batch["input_ids"]).loss.item()


def train(model, batch, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def frozen(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def adapter_tensor(model, name):
    _, adapters = find_attached(model)
    return adapters.get_parameter(name)


# -- the four single-adapter types ------------------------------------------------------

@pytest.fixture(scope="module", params=TYPES)
def trained(request, tokenizer, batch, tmp_path_factory):
    """apply -> 2 AdamW steps -> save, with what the tests compare against."""
    method = make_method(request.param)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    with find_attached(model)[1].disabled():
        without_bottleneck = logits(model, batch)
    start_logits, start_loss, start_frozen = logits(model, batch), loss(model, batch), frozen(model)
    start_trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train(model, batch)
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    method.save(model, run)
    return dict(type=request.param, method=method, model=model, run=run, without_bottleneck=without_bottleneck,
                start_logits=start_logits, start_loss=start_loss, start_frozen=start_frozen,
                start_trainable=start_trainable)


def test_zero_init_starts_equal(trained, tokenizer, batch):
    base = logits(tiny_llama(len(tokenizer)), batch)
    if trained["type"] == "mam":  # PEFT's prefix is random at init; the parallel adapter adds exactly 0
        assert torch.equal(trained["start_logits"], trained["without_bottleneck"])
        assert not torch.allclose(trained["start_logits"], base)
    else:
        assert torch.equal(trained["start_logits"], base)


def test_training_changes_only_adapter_parameters(trained, tokenizer, batch):
    model = trained["model"]
    assert loss(model, batch) != pytest.approx(trained["start_loss"], abs=1e-4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith(ADAPTER_PREFIXES) for n in names)
    assert any(".up.weight" in n for n in names)
    base_count = len(list(tiny_llama(len(tokenizer)).parameters()))
    assert len(trained["start_frozen"]) == base_count
    for name, before in trained["start_frozen"].items():
        assert torch.equal(model.get_parameter(name), before), name
    changed = [n for n, before in trained["start_trainable"].items() if not torch.equal(model.get_parameter(n), before)]
    assert any(".up.weight" in n for n in changed)
    assert (trained["type"] == "mam") == any(n.startswith("prompt_encoder.") for n in changed)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_save_load_on_fresh_base_gives_identical_logits(trained, tokenizer, batch):
    files = sorted(p.name for p in (trained["run"] / "adapter").iterdir())
    expected = ["adapter_model.safetensors", "tunelab_adapter.json"] + (["prefix"] if trained["type"] == "mam" else [])
    assert files == sorted(expected)
    saved = json.loads((trained["run"] / "adapter" / "tunelab_adapter.json").read_text())
    assert (saved["type"], saved["hidden_size"], saved["num_layers"]) == (trained["type"], 64, 2)
    assert saved["modules"]["mlp"] == "model.layers.{layer}.mlp"
    loaded = trained["method"].load(tiny_llama(len(tokenizer), seed=0), trained["run"])
    assert (logits(loaded, batch) - logits(trained["model"], batch)).abs().max() < 1e-6
    assert not any(p.requires_grad for p in loaded.parameters())


def test_generate_and_reference(trained, tokenizer, batch):
    model, method = trained["model"], trained["method"]
    prompt = tokenizer(["Who are you?"], return_tensors="pt")
    out = generation_target(model).generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 4)
    adapted = logits(model, batch)
    base = logits(tiny_llama(len(tokenizer)), batch)
    assert not torch.allclose(adapted, base)
    with method.reference(model):
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), adapted)


@pytest.mark.parametrize("type_", ["houlsby", "mam"])
def test_init_from_continues_the_saved_adapter(type_, tokenizer, batch, tmp_path):
    method = make_method(type_)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    train(model, batch)
    method.save(model, tmp_path)
    resumed = make_method(type_, init_from=str(tmp_path)).apply(tiny_llama(len(tokenizer)), tokenizer)
    assert (logits(resumed, batch) - logits(model, batch)).abs().max() < 1e-6
    assert any(".up.weight" in n for n, p in resumed.named_parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="reduction_factor 4 \\(this run: 8\\)"):
        get_method(MethodConfig(type=type_, reduction_factor=8, num_virtual_tokens=3, init_from=str(tmp_path))).apply(
            tiny_llama(len(tokenizer)), tokenizer)


# (sublayer kind, what the adapter reads) per type; "output" = sequential, "input" = parallel
PLACEMENT = {"houlsby": {"attn": "output", "mlp": "output"}, "pfeiffer": {"mlp": "output"},
             "parallel": {"mlp": "input"}, "mam": {"mlp": "input"}}


@pytest.mark.parametrize("type_", TYPES)
def test_adapters_sit_where_the_papers_put_them(type_, tokenizer, batch):
    """Adapter input = sublayer output (sequential) or input (parallel); new sublayer output
    = raw output + scaling * adapter; raw outputs are read at o_proj / down_proj."""
    model = make_method(type_, scaling=2.0).apply(tiny_llama(len(tokenizer)), tokenizer)
    layer = find_attached(model)[0].model.layers[1]
    seen = {}

    def record(key):
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            seen[key] = (inputs.detach(), (output[0] if isinstance(output, tuple) else output).detach())
        return hook

    adapters = find_attached(model)[1]
    assert adapters.kinds() == [kind for kind in ("attn", "mlp") if kind in PLACEMENT[type_]]
    sublayers = (("attn", layer.self_attn, layer.self_attn.o_proj), ("mlp", layer.mlp, layer.mlp.down_proj))
    for kind, sublayer, last in sublayers:
        sublayer.register_forward_hook(record(f"{kind}-sublayer"), with_kwargs=True)
        last.register_forward_hook(record(f"{kind}-raw"), with_kwargs=True)
        if kind in PLACEMENT[type_]:
            adapters.units["adapter"]["1"][kind].register_forward_hook(record(f"{kind}-adapter"), with_kwargs=True)
    perturbed(model, batch, layer=1)
    for kind, reads in PLACEMENT[type_].items():
        sub_in, adapted = seen[f"{kind}-sublayer"]
        raw, adapter_in, delta = seen[f"{kind}-raw"][1], *seen[f"{kind}-adapter"]
        assert torch.equal(adapter_in, sub_in if reads == "input" else raw)
        assert torch.allclose(adapted, raw + 2.0 * delta, atol=1e-6) and delta.abs().max() > 1e-3


# -- AdapterDrop ------------------------------------------------------------------------

def perturbed(model, batch, layer):
    """Logits after giving every adapter of ``layer`` a random non-zero up-projection."""
    for name, param in find_attached(model)[1].units.named_parameters():
        if name.startswith(f"adapter.{layer}.") and name.endswith("up.weight"):
            with torch.no_grad():
                param.normal_()
    return logits(model, batch)


@pytest.mark.parametrize("type_", TYPES)
def test_adapter_drop_skips_first_layers(type_, tokenizer, batch):
    model = make_method(type_, drop_layers=1).apply(tiny_llama(len(tokenizer)), tokenizer)
    before = logits(model, batch)
    assert torch.equal(perturbed(model, batch, layer=0), before)
    assert not torch.allclose(perturbed(model, batch, layer=1), before)


@pytest.mark.parametrize("drop_at", ["train", "inference"])
def test_adapter_drop_follows_train_and_eval_mode(drop_at, tokenizer, batch):
    model = make_method("pfeiffer", drop_layers=1, drop_at=drop_at).apply(tiny_llama(len(tokenizer)), tokenizer)
    before = {mode: logits(model.train(mode), batch) for mode in (True, False)}
    perturbed(model, batch, layer=0)
    after = {mode: logits(model.train(mode), batch) for mode in (True, False)}
    dropped_mode = drop_at == "train"
    assert torch.equal(after[dropped_mode], before[dropped_mode])
    assert not torch.allclose(after[not dropped_mode], before[not dropped_mode])


def test_adapter_drop_of_every_layer_is_refused(tokenizer):
    with pytest.raises(ConfigError, match="drop_layers = 2 .* below 2"):
        make_method("houlsby", drop_layers=2).apply(tiny_llama(len(tokenizer)), tokenizer)


# -- AdapterFusion ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def houlsby_runs(tokenizer, batch, tmp_path_factory):
    runs = []
    for seed in (1, 2):
        base = tiny_llama(len(tokenizer))
        torch.manual_seed(seed)  # after tiny_llama, which seeds 0: the two adapters start differently
        method = make_method("houlsby")
        model = method.apply(base, tokenizer)
        train(model, batch)
        runs.append(method.save(model, tmp_path_factory.mktemp(f"houlsby-{seed}")).parent)
    return runs


def unit_tensors(model):
    return {n: p.detach().clone() for n, p in find_attached(model)[1].units.named_parameters()}


def test_fusion_trains_only_fusion_and_round_trips(houlsby_runs, tokenizer, batch, tmp_path):
    method = make_method("adapter_fusion", fusion_adapters=[str(run) for run in houlsby_runs])
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("tunelab_adapters.fusion.") for n in names)
    units, start_frozen, start_loss = unit_tensors(model), frozen(model), loss(model, batch)
    train(model, batch)
    assert loss(model, batch) != pytest.approx(start_loss, abs=1e-4)
    assert all(torch.equal(units[n], t) for n, t in unit_tensors(model).items())
    assert all(torch.equal(model.get_parameter(n), t) for n, t in start_frozen.items())
    method.save(model, tmp_path)
    loaded = method.load(tiny_llama(len(tokenizer), seed=0), tmp_path)
    assert (logits(loaded, batch) - logits(model, batch)).abs().max() < 1e-6


def test_fusion_starts_as_the_average_of_its_adapters(houlsby_runs, tokenizer, batch):
    single = make_method("houlsby").load(tiny_llama(len(tokenizer)), houlsby_runs[0])
    twice = [str(houlsby_runs[0])] * 2
    fused = make_method("adapter_fusion", fusion_adapters=twice).apply(tiny_llama(len(tokenizer)), tokenizer)
    assert (logits(fused, batch) - logits(single, batch)).abs().max() < 1e-5
    both = make_method("adapter_fusion", fusion_adapters=[str(r) for r in houlsby_runs])
    assert not torch.allclose(logits(both.apply(tiny_llama(len(tokenizer)), tokenizer), batch), logits(single, batch))


def test_fusion_layer_starts_as_the_mean_and_can_learn():
    torch.manual_seed(0)
    fusion = Fusion(8)
    hidden, adapted = torch.randn(3, 8), torch.randn(2, 3, 8)
    assert torch.allclose(fusion(hidden, adapted), adapted.mean(0), atol=1e-6)
    fusion(hidden, adapted).square().sum().backward()
    assert fusion.key.weight.grad.abs().sum() > 0


def test_fusion_needs_two_adapters_of_a_fusable_type(houlsby_runs, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="lists 1 run"):
        make_method("adapter_fusion", fusion_adapters=[str(houlsby_runs[0])]).apply(
            tiny_llama(len(tokenizer)), tokenizer)
    mam = make_method("mam")
    mam.save(mam.apply(tiny_llama(len(tokenizer)), tokenizer), tmp_path)
    with pytest.raises(ConfigError, match="of type 'mam'.*'houlsby/pfeiffer/parallel' is needed"):
        make_method("adapter_fusion", fusion_adapters=[str(houlsby_runs[0]), str(tmp_path)]).apply(
            tiny_llama(len(tokenizer)), tokenizer)


# -- errors, registry, dtypes, layouts --------------------------------------------------

def test_registry_and_merge_refusal():
    assert {type(make_method(t)) for t in ("houlsby", "pfeiffer", "parallel")} == {BottleneckAdapter}
    assert isinstance(make_method("mam"), MixAndMatch) and isinstance(make_method("adapter_fusion"), AdapterFusion)
    assert not make_method("mam").supports_gradient_checkpointing
    for type_ in TYPES + ["adapter_fusion"]:
        method = make_method(type_)
        assert method.mergeable is False
        with pytest.raises(ConfigError, match=f"'{type_}' cannot be merged.*non-linearity"):
            method.merge(nn.Linear(2, 2))


def test_load_refuses_other_base_and_other_type(houlsby_runs, tokenizer):
    other = tiny_llama(len(tokenizer), hidden_size=32)
    with pytest.raises(ConfigError, match="hidden size 64 and 2 decoder layers.*LlamaForCausalLM.*hidden size 32"):
        make_method("houlsby").load(other, houlsby_runs[0])
    with pytest.raises(ConfigError, match="type 'houlsby'.*'pfeiffer' is needed"):
        make_method("pfeiffer").load(tiny_llama(len(tokenizer)), houlsby_runs[0])
    with pytest.raises(ConfigError, match="tunelab_adapter.json is missing"):
        make_method("houlsby").load(tiny_llama(len(tokenizer)), houlsby_runs[0].parent)


def test_unknown_layout_names_the_model_class(tokenizer):
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ConfigError, match="decoder layers of Toy"):
        make_method("houlsby").apply(Toy(), tokenizer)


def test_applying_twice_is_refused(tokenizer):
    model = make_method("houlsby").apply(tiny_llama(len(tokenizer)), tokenizer)
    with pytest.raises(ConfigError, match="already carries bottleneck adapters"):
        make_method("pfeiffer").apply(model, tokenizer)


def test_bf16_base_keeps_fp32_adapters(tokenizer, batch):
    model = make_method("parallel").apply(tiny_llama(len(tokenizer)).to(torch.bfloat16), tokenizer)
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    up = adapter_tensor(model, "units.adapter.1.mlp.up.weight")
    assert up.dtype == torch.float32 and up.grad is not None and up.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tokenizer, batch):
    grads = []
    for checkpointing in (False, True):
        base = tiny_llama(len(tokenizer))
        if checkpointing:
            base.activation_checkpointing_enable()
        torch.manual_seed(3)
        model = make_method("houlsby").apply(base, tokenizer).train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert grads[1]["tunelab_adapters.units.adapter.0.attn.up.weight"].abs().sum() > 0


def test_qwen2_layout(tokenizer, batch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    base = Qwen2ForCausalLM(config).eval()
    reference = logits(base, batch)
    model = make_method("houlsby").apply(base, tokenizer)
    assert torch.equal(logits(model, batch), reference)
    assert not torch.allclose(perturbed(model, batch, layer=1), reference)
