"""Loss maths against plain full-logit computations and hand-worked numbers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import ConfigError
from tunelab.train.losses import (
    causal_lm_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    pairwise_reward_loss,
    sequence_logps,
    simpo_loss,
    token_logps,
)

H, V = 8, 11


def softplus(x: float) -> float:
    """-log sigmoid(-x) written out: log(1 + e^x)."""
    return math.log(1 + math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture
def batch():
    """hidden [2, 7, H], a Linear head, labels with masked prompts: 10 supervised targets."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, H, dtype=torch.float64).float()
    head = nn.Linear(H, V, bias=False)
    labels = torch.tensor([[-100, -100, 3, 4, 5, 6, -100],
                           [-100, 1, 2, 7, 8, 9, 10]])
    return hidden, head, labels


def reference_loss(hidden, weight, labels):
    """The plain computation: full logits, shift, F.cross_entropy with ignore_index."""
    logits = hidden[:, :-1] @ weight.T
    return F.cross_entropy(logits.reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 4, 10, 100])
@pytest.mark.parametrize("head_kind", ["module", "weight"])
def test_chunked_ce_matches_full_logits_values_and_grads(batch, chunk_size, head_kind):
    hidden, head, labels = batch
    hidden = hidden.requires_grad_()
    lm_head = head if head_kind == "module" else head.weight
    loss, count = causal_lm_loss(hidden, lm_head, labels, chunk_size)
    expected = reference_loss(hidden, head.weight, labels)
    assert count == 10
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    got_h, got_w = grads(loss, hidden, head.weight)
    exp_h, exp_w = grads(expected, hidden, head.weight)
    torch.testing.assert_close(got_h, exp_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_w, exp_w, atol=1e-5, rtol=1e-5)


def test_masked_positions_are_ignored(batch):
    """Hidden t predicts labels[t+1]: row 0's positions 0 and 5 predict -100 and the
    last position of every row predicts nothing, so changing them changes nothing."""
    hidden, head, labels = batch
    loss, _ = causal_lm_loss(hidden, head, labels, chunk_size=2)
    changed = hidden.clone()
    changed[0, [0, 5]] = 100.0
    changed[:, -1] = -50.0
    torch.testing.assert_close(causal_lm_loss(changed, head, labels, chunk_size=2)[0], loss)
    hidden = hidden.clone().requires_grad_()
    (g,) = grads(causal_lm_loss(hidden, head, labels, 3)[0], hidden)
    assert g[0, [0, 5]].abs().sum() == 0 and g[:, -1].abs().sum() == 0
    assert (g[0, 1:5].abs().sum(-1) > 0).all() and (g[1, :6].abs().sum(-1) > 0).all()


def test_hand_computed_token_loss():
    """One supervised token, logits [0, log 3] -> p(target 1) = 3/4."""
    weight = torch.tensor([[0.0], [math.log(3)]])
    hidden = torch.ones(1, 2, 1)
    labels = torch.tensor([[-100, 1]])
    loss, count = causal_lm_loss(hidden, weight, labels, chunk_size=1)
    assert count == 1
    assert loss.item() == pytest.approx(-math.log(0.75), abs=1e-6)


def test_no_supervised_tokens_gives_attached_zero(batch):
    hidden, head, _ = batch
    hidden = hidden.requires_grad_()
    loss, count = causal_lm_loss(hidden, head, torch.full((2, 7), -100), chunk_size=4)
    assert count == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_chunked_head_saves_no_full_logits(batch):
    """Outside the checkpointed chunks autograd must not keep any [rows, vocab] tensor;
    the unchunked path does (this is the memory the chunking exists to save)."""
    hidden, _, labels = batch
    hidden = hidden.requires_grad_()
    head = nn.Linear(H, 1000, bias=False)
    labels = labels.clamp(max=999)

    def largest_saved(chunk_size):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                      lambda t: t):
            causal_lm_loss(hidden, head, labels, chunk_size)
        return max(sizes)

    assert largest_saved(0) >= 10 * 1000
    assert largest_saved(2) < 2 * 1000


def test_peft_wrapped_head_grads_match_unchunked(batch):
    peft = pytest.importorskip("peft")
    hidden, _, labels = batch

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(H, V, bias=False)

    torch.manual_seed(1)
    wrapped = peft.get_peft_model(Tiny(), peft.LoraConfig(
        r=2, target_modules=["lm_head"], init_lora_weights=False, lora_dropout=0.0))
    lm_head = wrapped.base_model.model.lm_head
    lora = [p for p in lm_head.parameters() if p.requires_grad]
    assert len(lora) == 2
    plain = grads(causal_lm_loss(hidden, lm_head, labels, 0)[0], *lora)
    chunked = grads(causal_lm_loss(hidden, lm_head, labels, 4)[0], *lora)
    for a, b in zip(plain, chunked):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_give_fp32_loss(batch):
    hidden, head, labels = batch
    expected = reference_loss(hidden, head.weight, labels)
    loss, _ = causal_lm_loss(hidden.bfloat16(), head.bfloat16(), labels, chunk_size=4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=0.1, rtol=0.02)


def test_shape_mismatch_is_explained(batch):
    hidden, head, labels = batch
    with pytest.raises(ValueError, match="not shifted"):
        causal_lm_loss(hidden, head, labels[:, 1:], chunk_size=4)


def test_token_logps_align_with_labels(batch):
    hidden, head, labels = batch
    got = token_logps(hidden, head, labels, chunk_size=4)
    logp = torch.log_softmax(hidden @ head.weight.T, dim=-1)
    assert got.shape == labels.shape
    assert got[0, 3].item() == pytest.approx(logp[0, 2, 4].item(), abs=1e-6)
    assert got[1, 6].item() == pytest.approx(logp[1, 5, 10].item(), abs=1e-6)
    assert (got[labels == -100] == 0).all() and (got[:, 0] == 0).all()
    hot = token_logps(hidden, head, labels, chunk_size=4, temperature=2.0)
    logp_hot = torch.log_softmax(hidden @ head.weight.T / 2.0, dim=-1)
    assert hot[1, 6].item() == pytest.approx(logp_hot[1, 5, 10].item(), abs=1e-6)


# ------------------------------------------------------------------ sequence_logps

def unpacked_logps(hidden, weight, labels):
    """Sum and count of label log-probs of ONE sequence [T, H], computed plainly."""
    logp = torch.log_softmax(hidden[:-1] @ weight.T, dim=-1)
    targets = labels[1:]
    keep = targets != -100
    return logp[keep].gather(1, targets[keep, None]).sum(), int(keep.sum())


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_sequence_logps_packed_equals_unpacked(chunk_size):
    torch.manual_seed(2)
    weight = torch.randn(V, H, requires_grad=True)
    seqs = [torch.randn(4, H), torch.randn(5, H), torch.randn(3, H)]
    # Every first label is supervised on purpose: packing must not predict across.
    seq_labels = [torch.tensor([1, 2, -100, 3]), torch.tensor([4, -100, 5, 6, 7]),
                  torch.tensor([8, 9, 10])]
    # Row 0 packs sequences 0 and 1 plus 2 padding tokens; row 1 holds sequence 2 + pad.
    pad_h, pad_l = torch.randn(8, H), torch.full((8,), 5)
    hidden = torch.stack([torch.cat([seqs[0], seqs[1], pad_h[:2]]),
                          torch.cat([seqs[2], pad_h[:8]])]).requires_grad_()
    labels = torch.stack([torch.cat([seq_labels[0], seq_labels[1], pad_l[:2]]),
                          torch.cat([seq_labels[2], pad_l[:8]])])
    index = torch.tensor([[0] * 4 + [1] * 5 + [-1] * 2, [2] * 3 + [-1] * 8])

    sums, counts = sequence_logps(hidden, weight, labels, index, 3, chunk_size)
    means, _ = sequence_logps(hidden, weight, labels, index, 3, chunk_size, average=True)
    expected = [unpacked_logps(s, weight, lab) for s, lab in zip(seqs, seq_labels)]
    assert counts.tolist() == [c for _, c in expected] == [2, 3, 2]
    torch.testing.assert_close(sums, torch.stack([s for s, _ in expected]))
    torch.testing.assert_close(means, torch.stack([s / c for s, c in expected]))

    got = grads(sums.sum(), weight)[0]
    exp = grads(sum(s for s, _ in expected), weight)[0]
    torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)


def test_sequence_logps_rejects_mismatched_index(batch):
    hidden, head, labels = batch
    with pytest.raises(ValueError, match="sequence_index"):
        sequence_logps(hidden, head, labels, torch.zeros(2, 6, dtype=torch.long), 2, 4)


# ------------------------------------------------------------------ preference losses

def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# policy chosen/rejected -10/-12, reference -11/-11: log-ratio margin h = 1 - (-1) = 2.
PC, PR, RC, RR = t(-10.0), t(-12.0), t(-11.0), t(-11.0)


def test_dpo_sigmoid_by_hand():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # -log sigmoid(0.1 * 2) = log(1 + e^-0.2)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert losses.item() == pytest.approx(0.598139, abs=1e-6)
    assert chosen.item() == pytest.approx(0.1) and rejected.item() == pytest.approx(-0.1)


def test_dpo_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)
    assert losses.item() == pytest.approx(expected, abs=1e-6)


def test_dpo_gradient_pushes_chosen_up():
    pc = PC.clone().requires_grad_()
    dpo_loss(pc, PR, RC, RR, beta=0.1)[0].sum().backward()
    # d/dpc -log sigmoid(beta h) = -beta * (1 - sigmoid(beta h))
    assert pc.grad.item() == pytest.approx(-0.1 * (1 - sigmoid(0.2)), abs=1e-6)


def test_ipo_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx((2 - 1 / (2 * 0.1)) ** 2)  # (2 - 5)^2 = 9


def test_hinge_by_hand():
    losses, _, _ = dpo_loss(t(-10.0, -5.0), t(-12.0, -20.0), t(-11.0, -10.0), t(-11.0, -10.0),
                            beta=0.1, loss_type="hinge")
    # margins 2 and 5 - (-10) = 15: max(0, 1 - 0.2) = 0.8, max(0, 1 - 1.5) = 0
    torch.testing.assert_close(losses, t(0.8, 0.0))


def test_dpo_config_errors():
    with pytest.raises(ConfigError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="unknown DPO loss type 'kto'"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")


def test_orpo_by_hand():
    losses, chosen, _ = orpo_loss(t(-0.5, -1e-9), t(-2.0, -3.0), beta=0.1)
    log_odds_c = -0.5 - math.log(1 - math.exp(-0.5))
    log_odds_r = -2.0 - math.log(1 - math.exp(-2.0))
    assert losses[0].item() == pytest.approx(0.1 * softplus(-(log_odds_c - log_odds_r)),
                                             abs=1e-6)
    # a chosen answer with probability ~1 has huge odds: finite, near-zero loss
    assert torch.isfinite(losses[1]) and losses[1].item() < 1e-4
    assert chosen[0].item() == pytest.approx(-0.05)


def test_simpo_by_hand():
    losses, chosen, rejected = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    # -log sigmoid(2 * (-0.5 + 1.0) - 0.5) = log(1 + e^-0.5)
    assert losses.item() == pytest.approx(softplus(-0.5), abs=1e-6)
    assert (chosen.item(), rejected.item()) == (pytest.approx(-1.0), pytest.approx(-2.0))


def test_kto_by_hand():
    policy = t(-5.0, -7.0).requires_grad_()
    desirable = torch.tensor([True, False])
    kl = torch.tensor(0.3, requires_grad=True)
    losses, rewards = kto_loss(policy, t(-6.0, -6.0), desirable, kl, beta=0.1,
                               desirable_weight=1.0, undesirable_weight=1.33)
    # log-ratios r = [1, -1]; desirable: 1 - sigmoid(0.1 (1 - 0.3));
    # undesirable: 1.33 (1 - sigmoid(0.1 (0.3 + 1)))
    assert losses[0].item() == pytest.approx(1 - sigmoid(0.07), abs=1e-6)
    assert losses[1].item() == pytest.approx(1.33 * (1 - sigmoid(0.13)), abs=1e-6)
    torch.testing.assert_close(rewards, t(0.1, -0.1))
    losses.sum().backward()
    assert kl.grad is None  # the reference point is a baseline, not optimised
    assert policy.grad[0] < 0 < policy.grad[1]


def test_kto_reference_point_clamps_and_detaches():
    policy = t(-5.0, -4.0).requires_grad_()
    assert kto_reference_point(policy, t(-4.5, -2.0)).item() == 0.0  # mean(-0.5, -2) < 0
    z0 = kto_reference_point(policy, t(-6.0, -4.2))  # mean(1.0, 0.2) = 0.6
    assert z0.item() == pytest.approx(0.6) and not z0.requires_grad


def test_bradley_terry_by_hand():
    chosen, rejected = t(2.0, 0.5, 1.0), t(1.0, 1.5, 1.0)
    losses = pairwise_reward_loss(chosen, rejected)
    expected = [softplus(-1.0), softplus(1.0), math.log(2)]
    for got, want in zip(losses.tolist(), expected):
        assert got == pytest.approx(want, abs=1e-6)


def test_preference_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        pairwise_reward_loss(t(1.0, 2.0), t(1.0))
