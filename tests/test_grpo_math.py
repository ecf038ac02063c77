"""GRPO-family maths against the papers' formulas, written out by hand on small tensors.

Every expected value below is computed with plain Python loops straight from the
formula (cited per test), not with the functions under test.
"""

import math

import pytest
import torch

from tunelab.train.grpo_math import (StepScope, equal_reward_groups, group_advantages, k3_kl, policy_loss)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# Two prompts x G=3 completions of 4, 2 / 3, 1 / 1, 4 tokens (right-padded to T=4).
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                     [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
NEW = t([-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, 9.0, 9.0], [-0.7, -0.2, -1.1, 9.0],
        [-2.0, 9.0, 9.0, 9.0], [-0.4, 9.0, 9.0, 9.0], [-0.9, -0.6, -0.3, -1.5])
OLD = t([-1.1, -0.2, -2.0, -0.5], [-0.3, -1.0, 0.0, 0.0], [-0.9, -0.2, -1.0, 0.0],
        [-1.5, 0.0, 0.0, 0.0], [-0.4, 0.0, 0.0, 0.0], [-1.0, -0.6, -0.1, -1.0])
REF = t([-1.2, -0.5, -1.8, -0.3], [-0.5, -1.2, 0.0, 0.0], [-0.7, -0.4, -1.1, 0.0],
        [-1.8, 0.0, 0.0, 0.0], [-0.6, 0.0, 0.0, 0.0], [-0.9, -0.8, -0.3, -1.2])
ADV = t(1.0, -0.5, -0.5, 2.0, -1.0, -1.0)
EPS, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def rows_of(tensor):
    """The real tokens of each completion as plain floats."""
    return [[float(v) for v, m in zip(row, mrow) if m] for row, mrow in zip(tensor, MASK)]


def token_terms(eps_low, eps_high, beta):
    """Per completion, the per-token l_t = -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) + beta k3."""
    out = []
    for new, old, ref, adv in zip(rows_of(NEW), rows_of(OLD), rows_of(REF), ADV.tolist()):
        terms = []
        for n, o, r in zip(new, old, ref):
            rho = math.exp(n - o)
            surrogate = -min(rho * adv, min(max(rho, 1 - eps_low), 1 + eps_high) * adv)
            k3 = math.exp(r - n) - (r - n) - 1  # DeepSeekMath eq. 4
            terms.append(surrogate + beta * k3)
        out.append(terms)
    return out


def loss_of(kind, **kw):
    return policy_loss(NEW, OLD, ADV, MASK, loss=kind, epsilon=EPS, epsilon_high=EPS_HIGH, ref_logprobs=REF,
                       beta=BETA, **kw)


# ----------------------------------------------------------------------------- advantages

def test_group_advantage_is_mean_and_std_normalised():
    rewards = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]
    adv = group_advantages(torch.tensor(rewards), 3).tolist()
    group = rewards[:3]
    mean = sum(group) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in group) / 2)  # sample std (Bessel)
    assert adv[:3] == pytest.approx([(r - mean) / (std + 1e-4) for r in group], rel=1e-5)
    assert adv[3:] == [0.0, 0.0, 0.0]  # all-equal group: no signal, not NaN
    unscaled = group_advantages(torch.tensor(rewards), 3, scale=False).tolist()  # Dr. GRPO
    assert unscaled[:3] == pytest.approx([r - mean for r in group])


def test_rloo_advantage_is_leave_one_out():
    rewards = [3.0, 1.0, 0.0, 2.0]
    adv = group_advantages(torch.tensor(rewards), 4, kind="rloo", scale=False).tolist()
    expected = [r - (sum(rewards) - r) / 3 for r in rewards]  # RLOO: r_i - mean of the others
    assert adv == pytest.approx(expected)
    assert expected == pytest.approx([2.0, -2 / 3, -2.0, 2 / 3])  # e.g. 3 - (1 + 0 + 2) / 3
    with pytest.raises(ValueError, match="at least two"):
        group_advantages(torch.tensor([1.0, 2.0]), 1, kind="rloo")
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_equal_reward_groups_fraction():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 2.0, 2.0])
    assert equal_reward_groups(rewards, 2) == 1.0
    assert equal_reward_groups(rewards, 4) == 0.0
    assert equal_reward_groups(torch.tensor([1.0, 1.0, 1.0, 0.0]), 2) == 0.5


def test_k3_is_nonnegative_and_zero_at_equality():
    logp, ref = t(-1.0, -2.0, -0.5), t(-1.0, -1.0, -3.0)
    kl = k3_kl(logp, ref).tolist()
    assert kl[0] == 0.0
    assert kl[1] == pytest.approx(math.exp(1.0) - 1.0 - 1)
    assert kl[2] == pytest.approx(math.exp(-2.5) + 2.5 - 1)


# ----------------------------------------------------------------------------- losses

def test_grpo_loss_is_sequence_mean_then_batch_mean():
    terms = token_terms(EPS, EPS_HIGH, BETA)
    expected = sum(sum(ts) / len(ts) for ts in terms) / len(terms)  # DeepSeekMath eq. 3
    assert loss_of("grpo").loss.item() == pytest.approx(expected, rel=1e-5)


def test_dapo_loss_is_token_mean_over_the_batch():
    terms = token_terms(EPS, EPS_HIGH, BETA)
    expected = sum(sum(ts) for ts in terms) / sum(len(ts) for ts in terms)  # DAPO eq. 8
    out = loss_of("dapo")
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() != pytest.approx(loss_of("grpo").loss.item(), rel=1e-3)


def test_dr_grpo_loss_uses_a_constant_normaliser():
    terms = token_terms(EPS, EPS_HIGH, BETA)
    expected = sum(sum(ts) for ts in terms) / (len(terms) * 16)  # Dr. GRPO: / (G x max length)
    scope = StepScope(sequences=6, tokens=15, max_completion_length=16)
    assert loss_of("dr_grpo", scope=scope).loss.item() == pytest.approx(expected, rel=1e-5)


def test_bnpo_normalises_each_micro_batch_by_its_own_tokens():
    terms = token_terms(EPS, EPS_HIGH, BETA)
    first, second = terms[:3], terms[3:]
    expected = (sum(map(sum, first)) / sum(map(len, first)) + sum(map(sum, second)) / sum(map(len, second))) / 2
    scope = StepScope(sequences=6, tokens=15, max_completion_length=4, micro_batches=2)
    halves = [policy_loss(NEW[i], OLD[i], ADV[i], MASK[i], loss="bnpo", epsilon=EPS, epsilon_high=EPS_HIGH,
                          ref_logprobs=REF[i], beta=BETA, scope=scope).loss.item() for i in (slice(0, 3), slice(3, 6))]
    assert sum(halves) == pytest.approx(expected, rel=1e-5)
    assert loss_of("bnpo").loss.item() == pytest.approx(loss_of("dapo").loss.item(), rel=1e-6)  # one micro-batch


def test_gspo_loss_uses_the_sequence_level_ratio():
    expected = 0.0
    for new, old, ref, adv in zip(rows_of(NEW), rows_of(OLD), rows_of(REF), ADV.tolist()):
        s = math.exp(sum(n - o for n, o in zip(new, old)) / len(new))  # GSPO eq. 7
        surrogate = -min(s * adv, min(max(s, 1 - EPS), 1 + EPS_HIGH) * adv)
        kl = sum(math.exp(r - n) - (r - n) - 1 for n, r in zip(new, ref)) / len(new)
        expected += (surrogate + BETA * kl) / 6
    assert loss_of("gspo").loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_micro_batches_add_up_to_the_whole_batch(kind):
    scope = StepScope.of(MASK, max_completion_length=8)
    whole = loss_of(kind, scope=scope).loss.item()
    parts = sum(policy_loss(NEW[i], OLD[i], ADV[i], MASK[i], loss=kind, epsilon=EPS, epsilon_high=EPS_HIGH,
                            ref_logprobs=REF[i], beta=BETA, scope=scope).loss.item()
                for i in (slice(0, 2), slice(2, 5), slice(5, 6)))
    assert parts == pytest.approx(whole, rel=1e-5)


def test_first_update_gradient_is_advantage_times_score():
    """With old = new (one update per batch) every ratio is 1: grad = -A grad log pi / norm."""
    new = NEW.clone().requires_grad_(True)
    out = policy_loss(new, new.detach(), ADV, MASK, loss="dapo", epsilon=EPS)
    out.loss.backward()
    expected = -ADV.unsqueeze(1) * MASK / MASK.sum()
    torch.testing.assert_close(new.grad, expected)
    assert out.clip_ratio == 0.0 and out.kl == 0.0


def test_clip_higher_and_clip_metrics():
    # rho = e^{0.3} = 1.35 with A > 0: clipped at 1.2 but not at 1.4; rho = e^{-0.5} = 0.61 with A < 0: clipped.
    new, old = t([0.3, -0.5]), t([0.0, 0.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    adv = t(1.0)
    tight = policy_loss(new, old, adv, mask, loss="dapo", epsilon=0.2)
    assert tight.loss.item() == pytest.approx(-(1.2 + math.exp(-0.5)) / 2)
    assert (tight.clip_high, tight.clip_low) == (0.5, 0.0)
    loose = policy_loss(new, old, adv, mask, loss="dapo", epsilon=0.2, epsilon_high=0.4)
    assert loose.loss.item() == pytest.approx(-(math.exp(0.3) + math.exp(-0.5)) / 2)
    assert loose.clip_ratio == 0.0
    negative = policy_loss(new, old, -adv, mask, loss="dapo", epsilon=0.2)
    assert (negative.clip_low, negative.clip_high) == (0.5, 0.0)  # the -0.5 token, below 0.8 with A < 0
    assert negative.loss.item() == pytest.approx((math.exp(0.3) + 0.8) / 2)


def test_kl_metric_and_beta_zero_needs_no_reference():
    out = loss_of("grpo")
    kl_tokens = [math.exp(r - n) - (r - n) - 1 for new, ref in zip(rows_of(NEW), rows_of(REF))
                 for n, r in zip(new, ref)]
    assert out.kl == pytest.approx(sum(kl_tokens) / len(kl_tokens), rel=1e-5)
    free = policy_loss(NEW, OLD, ADV, MASK, loss="grpo", epsilon=EPS, beta=0.0)
    assert free.kl == 0.0
    with pytest.raises(ValueError, match="reference"):
        policy_loss(NEW, OLD, ADV, MASK, loss="grpo", epsilon=EPS, beta=0.1)


def test_padding_never_moves_a_loss():
    noisy_new, noisy_old = NEW.clone(), OLD.clone()
    noisy_new[~MASK], noisy_old[~MASK] = 50.0, -50.0
    for kind in ("grpo", "dapo", "bnpo", "dr_grpo", "gspo"):
        clean = loss_of(kind).loss.item()
        noisy = policy_loss(noisy_new, noisy_old, ADV, MASK, loss=kind, epsilon=EPS, epsilon_high=EPS_HIGH,
                            ref_logprobs=REF, beta=BETA).loss.item()
        assert noisy == pytest.approx(clean, rel=1e-6), kind
