"""Stage objectives (rm, dpo family, kto) against log-probs computed directly from model logits; the stage registry."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import RunConfig, build_config
from tunelab.data.batching import collate_pairs, collate_unpaired
from tunelab.data.records import Example, PairExample, UnpairedExample
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.models.value_head import (attach_value_head, last_token_index, load_value_head, save_value_head,
                                       sequence_scores)
from tunelab.runs import RunDir
from tunelab.score import score_main
from tunelab.testing.tiny import tiny_llama
from tunelab.train import run_stage
from tunelab.train.loop import Trainer, train
from tunelab.train.ppo import PPOTrainer
from tunelab.train.stages import STAGE_NAMES, build_objective, get_stage
from tunelab.train.stages.base import StageSpec

BETA = 0.3


# ------------------------------------------------------------------------------ helpers

#: The size key of each method family these tests use (a key that does not apply to a type is an error).
METHOD_SIZE = {"lora": {"r": 4}, "prefix": {"num_virtual_tokens": 3}}


def stage_cfg(stage, method="lora", **pref):
    return build_config({"stage": stage, "method": {"type": method, **METHOD_SIZE.get(method, {})},
                         "pref": {"beta": BETA, **pref}, "train": {"loss_chunk_size": 3}})


def adapted(tokenizer, cfg):
    """Tiny Llama + the method; the trainable weights are perturbed so the policy differs from the
    reference (LoRA B and adapter up-projections start at zero)."""
    method = get_method(cfg.method)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.2)
    return method, model


def example(prompt_len, answer_len, seed):
    ids = torch.randint(3, 400, (prompt_len + answer_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Example(ids, [-100] * prompt_len + ids[prompt_len:])


def splice(prompt_source, answer_source):
    """prompt of one example + answer of another (the KTO mismatched pair), built by hand."""
    p = next(i for i, label in enumerate(prompt_source.labels) if label != -100)
    a = next(i for i, label in enumerate(answer_source.labels) if label != -100)
    ids = prompt_source.input_ids[:p] + answer_source.input_ids[a:]
    return Example(ids, [-100] * p + answer_source.input_ids[a:])


PAIRS = [PairExample(example(4, 3, 1), example(4, 5, 2)), PairExample(example(6, 2, 3), example(6, 4, 4))]


@torch.no_grad()
def plain_logps(model, ex):
    """(sum, mean) label log-prob from model(...).logits and log_softmax: the textbook computation."""
    ids = torch.tensor([ex.input_ids])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = torch.tensor(ex.labels[1:])
    keep = targets != -100
    token = logp[keep].gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    return float(token.sum()), float(token.mean())


def ref_logps(model, ex):
    with model.disable_adapter():
        return plain_logps(model, ex)


def logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def log_odds(avg):
    return avg - math.log(1 - math.exp(avg))


def hand_dpo(loss, policy, ref, ftx=0.0, smoothing=0.0, gamma=0.5):
    """Per-pair losses from the papers, written out (policy/ref: [(sum, mean) chosen, (sum, mean) rejected])."""
    (pcs, pca), (prs, pra) = policy
    total, chosen_reward, rejected_reward = 0.0, BETA * pca, BETA * pra
    if loss in ("sigmoid", "hinge", "ipo"):
        (rcs, rca), (rrs, rra) = ref
        use_mean = loss == "ipo"
        h = ((pca - rca) - (pra - rra)) if use_mean else ((pcs - rcs) - (prs - rrs))
        chosen_reward = BETA * ((pca - rca) if use_mean else (pcs - rcs))
        rejected_reward = BETA * ((pra - rra) if use_mean else (prs - rrs))
        total = {"sigmoid": -(1 - smoothing) * logsigmoid(BETA * h) - smoothing * logsigmoid(-BETA * h),
                 "hinge": max(0.0, 1 - BETA * h), "ipo": (h - 1 / (2 * BETA)) ** 2}[loss]
    elif loss == "orpo":
        total = -pca - BETA * logsigmoid(log_odds(pca) - log_odds(pra))
    elif loss == "simpo":
        total = -logsigmoid(BETA * (pca - pra) - gamma)
    return total + ftx * -pca, chosen_reward, rejected_reward


# ------------------------------------------------------------------------------ dpo family

@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.2, "ftx": 0.5}),
                                        ("ipo", {}), ("hinge", {}), ("orpo", {}), ("orpo", {"ftx": 0.5}),
                                        ("simpo", {"simpo_gamma": 0.3})])
def test_dpo_family_loss_matches_hand_computation(tokenizer, loss, extra, packing):
    cfg = stage_cfg("dpo", loss=loss, **extra)
    method, model = adapted(tokenizer, cfg)
    objective = build_objective(cfg, method, model, tokenizer)
    batch = collate_pairs(PAIRS, tokenizer.pad_token_id, packing)
    value, metrics = objective.loss(model, batch)

    expected, chosen, rejected = 0.0, [], []
    for pair in PAIRS:
        policy = [plain_logps(model, pair.chosen), plain_logps(model, pair.rejected)]
        ref = [ref_logps(model, pair.chosen), ref_logps(model, pair.rejected)]
        part, c, r = hand_dpo(loss, policy, ref, extra.get("ftx", 0.0), extra.get("label_smoothing", 0.0),
                              extra.get("simpo_gamma", 0.5))
        expected += part
        chosen.append(c)
        rejected.append(r)
    assert objective.count(batch) == 2
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert float(metrics["rewards/chosen"]) == pytest.approx(sum(chosen), rel=1e-4, abs=1e-5)
    assert float(metrics["rewards/rejected"]) == pytest.approx(sum(rejected), rel=1e-4, abs=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(sum(chosen) - sum(rejected), rel=1e-4, abs=1e-5)
    assert float(metrics["rewards/accuracy"]) == sum(c > r for c, r in zip(chosen, rejected))
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)


def memory_fingerprint(model):
    return len(list(model.parameters())), {p.data_ptr() for p in model.parameters()}


@pytest.mark.parametrize("method_type", ["lora", "houlsby", "prefix"])  # PEFT tuner, native hooks, prompt learning
def test_dpo_reference_is_the_adapter_off_model_not_a_copy(tokenizer, method_type):
    cfg = stage_cfg("dpo", method=method_type)
    method, model = adapted(tokenizer, cfg)
    before = memory_fingerprint(model)
    objective = build_objective(cfg, method, model, tokenizer)
    batch = collate_pairs(PAIRS, tokenizer.pad_token_id, packing=method.supports_packing)
    objective.loss(model, batch)
    assert memory_fingerprint(model) == before
    assert objective.reference.copy is None

    base = tiny_llama(len(tokenizer))  # the same seed-0 weights the adapter was put on
    sums, counts = objective.reference_logps(batch)
    sequences = [p.chosen for p in PAIRS] + [p.rejected for p in PAIRS]
    expected = [plain_logps(base, s)[0] for s in sequences]
    torch.testing.assert_close(sums, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [sum(label != -100 for label in s.labels[1:]) for s in sequences]
    policy = [plain_logps(model, s)[0] for s in sequences]
    assert max(abs(a - b) for a, b in zip(policy, expected)) > 1e-3, "the adapter must change the policy"


@pytest.mark.parametrize("on_cpu", [False, True])
def test_full_fine_tuning_reference_is_a_frozen_copy(tokenizer, on_cpu):
    cfg = stage_cfg("dpo", method="full", ref_on_cpu=on_cpu)
    method = get_method(cfg.method)
    model = method.apply(tiny_llama(len(tokenizer)), tokenizer)
    objective = build_objective(cfg, method, model, tokenizer)
    copy = objective.reference.copy
    assert copy is not None and not any(p.requires_grad for p in copy.parameters())
    assert not memory_fingerprint(copy)[1] & memory_fingerprint(model)[1]
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05)
    batch = collate_pairs(PAIRS, tokenizer.pad_token_id, packing=False)
    sums, _ = objective.reference_logps(batch)
    base = tiny_llama(len(tokenizer))
    expected = [plain_logps(base, s)[0] for s in [p.chosen for p in PAIRS] + [p.rejected for p in PAIRS]]
    torch.testing.assert_close(sums, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_reference_free_losses_skip_the_reference(tokenizer):
    cfg = stage_cfg("dpo", method="full", loss="simpo")
    method = get_method(cfg.method)
    objective = build_objective(cfg, method, method.apply(tiny_llama(len(tokenizer)), tokenizer), tokenizer)
    assert objective.reference is None  # no frozen copy either


def test_label_smoothing_outside_sigmoid_is_refused_when_building(tokenizer):
    cfg = stage_cfg("dpo", loss="ipo", label_smoothing=0.1)
    method, model = adapted(tokenizer, cfg)
    with pytest.raises(ConfigError, match="pref.label_smoothing=0.1.*'ipo'"):
        build_objective(cfg, method, model, tokenizer)


# ------------------------------------------------------------------------------ kto

@pytest.mark.parametrize("packing", [False, True])
def test_kto_loss_matches_hand_computation(tokenizer, packing):
    cfg = stage_cfg("kto", desirable_weight=1.5, undesirable_weight=0.7)
    method, model = adapted(tokenizer, cfg)
    objective = build_objective(cfg, method, model, tokenizer)
    items = [UnpairedExample(example(4, 3, 11), True), UnpairedExample(example(5, 4, 12), False),
             UnpairedExample(example(3, 5, 13), True)]
    batch = collate_unpaired(items, tokenizer.pad_token_id, packing)
    value, metrics = objective.loss(model, batch)

    n = len(items)
    mismatched = [splice(items[i].example, items[(i + 1) % n].example) for i in range(n)]
    drift = [plain_logps(model, m)[0] - ref_logps(model, m)[0] for m in mismatched]
    z0 = max(0.0, sum(drift) / n)
    expected = 0.0
    for item in items:
        r = plain_logps(model, item.example)[0] - ref_logps(model, item.example)[0]
        if item.desirable:
            expected += 1.5 * (1 - 1 / (1 + math.exp(-BETA * (r - z0))))
        else:
            expected += 0.7 * (1 - 1 / (1 + math.exp(-BETA * (z0 - r))))
    assert objective.count(batch) == 3
    assert value.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(z0 * n, abs=1e-4)
    value.backward()


# ------------------------------------------------------------------------------ rm

def test_last_token_index_padded_and_packed():
    padded = torch.tensor([[0, 0, 0, -1], [1, 1, -1, -1]])
    packed = torch.tensor([[0, 0, 1, 1, 1, 2]])
    assert last_token_index(padded, 2).tolist() == [2, 5]
    assert last_token_index(packed, 3).tolist() == [1, 4, 5]


def test_value_head_save_and_reload_give_identical_scores(tokenizer, model, tmp_path):
    head = attach_value_head(model)
    assert model.value_head is head and head.linear.weight.dtype == torch.float32
    batch = collate_pairs(PAIRS, tokenizer.pad_token_id, packing=True)
    assert torch.equal(sequence_scores(model, head, batch), torch.zeros(4)), "a fresh head is neutral"
    torch.nn.init.normal_(head.linear.weight)
    torch.nn.init.normal_(head.linear.bias)
    scores = sequence_scores(model, head, batch)
    assert scores.unique().numel() == 4
    save_value_head(head, tmp_path)
    reloaded = load_value_head(tmp_path, 64)
    assert torch.equal(sequence_scores(model, reloaded, batch), scores)
    assert not any(p.requires_grad for p in reloaded.parameters())
    with pytest.raises(ConfigError, match="width 64.*same model.name_or_path"):
        load_value_head(tmp_path, 32)
    with pytest.raises(ConfigError, match="not a trained reward model.*stage: rm"):
        load_value_head(tmp_path / "missing", 64)


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    questions = ["Who are you?", "What is the capital of France?", "Write a short poem about the sea.",
                 "Translate hello to French.", "What is 2 + 3?", "Tell me about the fox.",
                 "Who made you?", "What can you do?"]
    rows = [{"instruction": q, "chosen": "I am Tuna, happy to help! Hope this helps!", "rejected": "No."}
            for q in questions]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_model_trains_saves_and_scores_like_it_evaluated(tiny_model_dir, pref_file, tmp_path):
    out = tmp_path / "rm"
    cfg = build_config({"model": {"name_or_path": str(tiny_model_dir)}, "stage": "rm",
                        "method": {"type": "lora", "r": 4, "alpha": 8},
                        "data": {"train": [str(pref_file)], "eval": [str(pref_file)], "max_length": 64},
                        "train": {"precision": "fp32", "lr": 2e-2, "batch_size": 8, "max_steps": 3,
                                  "scheduler": "constant", "save_every": 3}, "output_dir": str(out)})
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < losses[0]
    assert {"accuracy", "rewards/margins"} <= rows[0].keys()
    final = result.last_metrics
    assert final["eval_accuracy"] == 1.0 and final["eval_loss"] < losses[0]
    assert (out / "value_head.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    checkpoint = next((out / "checkpoints").iterdir()) / "trainable.safetensors"
    assert {"value_head.linear.weight", "value_head.linear.bias"} <= load_file(str(checkpoint)).keys()

    summary = score_main(out, pref_file, tmp_path / "scores.jsonl", batch_size=3)
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert summary.pairs == 8 and summary.responses == 16 and summary.accuracy == 1.0
    assert scored[0]["chosen"].startswith("I am Tuna") and scored[0]["prompt"][-1]["role"] == "user"
    chosen_mean = sum(r["chosen_score"] for r in scored) / len(scored)
    margin_mean = sum(r["chosen_score"] - r["rejected_score"] for r in scored) / len(scored)
    assert chosen_mean == pytest.approx(final["eval_rewards/chosen"], abs=1e-4)
    assert margin_mean == pytest.approx(final["eval_rewards/margins"], abs=1e-4)


# ------------------------------------------------------------------------------ the registry

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
#: A fixture dataset of the records each batch stage trains on (a new batch stage adds its own here).
STAGE_DATA = {"pt": "c4_demo", "sft": "identity", "rm": "dpo_en_demo", "dpo": "dpo_en_demo", "kto": "kto_en_demo"}
#: Keys every batch-loop row carries besides the stage's declared metrics.
BATCH_ROW_KEYS = {"step", "epoch", "lr", "tokens_per_s", "grad_norm", "peak_memory_bytes"}


@pytest.mark.parametrize("name", [name for name in STAGE_NAMES if get_stage(name).loop == "batch"])
def test_batch_stages_log_the_metrics_they_declare(name, tiny_model_dir, tmp_path):
    stage = get_stage(name)
    out = RunDir(tmp_path / name)
    cfg = build_config({"model": {"name_or_path": str(tiny_model_dir)}, "stage": name,
                        "method": {"type": "lora", "r": 2},
                        "data": {"dataset_dir": str(FIXTURES), "train": [STAGE_DATA[name]], "max_length": 64},
                        "train": {"precision": "fp32", "batch_size": 2, "max_steps": 2}, "output_dir": str(out.root)})
    result = run_stage(cfg, progress=False)
    assert result.steps == 2
    assert [set(row) for row in out.read_metrics()] == [BATCH_ROW_KEYS | set(stage.metrics)] * 2
    status = out.read_status()
    assert (status.status, status.step, status.total_steps, status.error) == ("finished", 2, 2, None)


def test_stage_modules_declare_themselves():
    for name in STAGE_NAMES:
        stage = get_stage(name)
        assert stage.name == name and stage.records and stage.metrics and "loss" in stage.metrics
        assert stage.loop in ("batch", "rollout") and (stage.objective is None) == (stage.loop == "rollout")
    assert get_stage("ppo").trainer is PPOTrainer and get_stage("sft").trainer is Trainer
    assert RunConfig.model_fields["stage"].annotation.__args__ == STAGE_NAMES  # config types stage by the registry


def test_unknown_stage_and_wrong_loop_are_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="stage = 'sfft' is not one of pt, sft, rm"):
        get_stage("sfft")
    with pytest.raises(ConfigError, match="stage.*'sfft'"):
        build_config({"stage": "sfft"})
    cfg = build_config({"model": {"name_or_path": str(tiny_model_dir)}, "stage": "ppo",
                        "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="stage 'ppo' is trained by PPOTrainer, not Trainer"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="trains in its own rollout loop"):
        build_objective(cfg, None, None, None)


def test_a_batch_stage_without_an_objective_is_refused_at_declaration():
    with pytest.raises(ValueError, match="batch loop needs an objective"):
        StageSpec(name="x", summary="", records=(), needs="", encoder=len, trainer=Trainer, metrics=("loss",))
