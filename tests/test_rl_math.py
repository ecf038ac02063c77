"""PPO maths against hand-worked examples (right-padded [N, T] tensors)."""

import math

import pytest
import torch

from tunelab.train.rl_math import (
    entropy_from_logits,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_and_var_ignore_padding():
    values, mask = t(1.0, 2.0, 3.0, 100.0), torch.tensor([1, 1, 1, 0])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_var(values, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3)
    rows, row_mask = t([1.0, 3.0], [5.0, 9.0]), torch.tensor([[1, 1], [1, 0]])
    assert masked_mean(rows, row_mask, dim=1).tolist() == [2.0, 5.0]
    assert masked_mean(values, torch.zeros(4)).item() == 0.0  # empty: 0, not NaN


def test_whitening_over_masked_entries():
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 7
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = mask[3, 1:] = False
    values[~mask] = 1e4  # padding must not move the statistics
    white = masked_whiten(values, mask)
    kept = white[mask]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert kept.var().item() == pytest.approx(1.0, abs=1e-5)
    assert (white[~mask] == 0).all()
    scaled = masked_whiten(values, mask, shift_mean=False)[mask]
    assert scaled.mean().item() == pytest.approx(values[mask].mean().item(), rel=1e-5)
    assert scaled.var().item() == pytest.approx(1.0, abs=1e-5)


def test_kl_penalised_rewards_by_hand():
    score = t(1.0, 2.0)
    logprobs = t([-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0])
    ref = t([-1.5, -2.0, -9.0], [-1.0, -2.0, 0.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl = kl_penalised_rewards(score, logprobs, ref, mask, kl_coef=0.1)
    # row 0: token KL [0.5, 0, pad] -> [-0.05, 0 + score 1.0, 0]
    # row 1: token KL [0, 1, 0]     -> [0, -0.1, 0 + score 2.0]
    torch.testing.assert_close(rewards, t([-0.05, 1.0, 0.0], [0.0, -0.1, 2.0]))
    torch.testing.assert_close(kl, t(0.5, 1.0))


def test_gae_hand_worked_with_padding():
    rewards = t([1.0, 0.0, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0])
    values = t([0.5, 1.0, 1.5, 9.0], [0.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0 (last step is padding, so V after step 2 is 0):
    #   d2 = 2 + 0.9*0 - 1.5 = 0.5              A2 = 0.5
    #   d1 = 0 + 0.9*1.5 - 1.0 = 0.35           A1 = 0.35 + 0.72*0.5 = 0.71
    #   d0 = 1 + 0.9*1.0 - 0.5 = 1.4            A0 = 1.4 + 0.72*0.71 = 1.9112
    # Row 1 (values 0, reward 1 at the end): A = 0.72^k back from the end.
    expected_adv = t([1.9112, 0.71, 0.5, 0.0], [0.72 ** 3, 0.72 ** 2, 0.72, 1.0])
    torch.testing.assert_close(advantages, expected_adv)
    torch.testing.assert_close(returns, t([2.4112, 1.71, 2.0, 0.0], [0.373248, 0.5184, 0.72, 1.0]))


def test_gae_lambda_one_gives_discounted_returns():
    rewards, values = t([1.0, 2.0, 3.0]), t([0.3, -0.2, 0.7])
    _, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=1.0)
    # Monte Carlo: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75
    torch.testing.assert_close(returns, t([2.75, 3.5, 3.0]))


def test_policy_loss_clipping_by_hand():
    ratios = [1.5, 0.5, 1.1, 1.0, 0.5, 3.0]
    advantages = t([1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.zeros(1, 6)
    new = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=1 : max(-1.5, -1.2) = -1.2   clipped
    #   r=0.5, A=1 : max(-0.5, -0.8) = -0.5
    #   r=1.1, A=-1: max( 1.1,  1.1) =  1.1
    #   r=1.0, A=1 : max(-1.0, -1.0) = -1.0
    #   r=0.5, A=-1: max( 0.5,  0.8) =  0.8   clipped
    #   r=3.0      : padding
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 - 1.0 + 0.8) / 5, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 5)
    k3 = sum((r - 1) - math.log(r) for r in ratios[:5]) / 5
    assert approx_kl.item() == pytest.approx(k3, abs=1e-6)
    loss.backward()
    # d/dlogp of -A r = -A r / 5 where unclipped; 0 where the clip is active or padded
    expected_grad = [0.0, -0.5 / 5, 1.1 / 5, -1.0 / 5, 0.0, 0.0]
    torch.testing.assert_close(new.grad, torch.tensor([expected_grad]))


def test_value_loss_clipping_by_hand():
    new = t([1.0, 2.0, 0.0, 50.0])
    old = t([0.8, 1.0, 0.5, 0.0])
    returns = t([1.5, 1.5, 0.0, 0.0])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(new, old, returns, mask, cliprange_value=0.2)
    # V_clip = [1.0, 1.2, 0.3]; errors (new, clipped): (0.25, 0.25), (0.25, 0.09), (0, 0.09)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.09) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_entropy_from_logits_by_hand():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, :2] = torch.tensor([0.0, math.log(3)])
    logits[0, 1, 2:] = float("-inf")  # p = [1/4, 3/4, 0, 0]
    logits[0, 2, 0] = 50.0  # padding (entropy ~0): must not count
    mask = torch.tensor([[1, 1, 0]])
    h_uniform = math.log(4)
    h_skewed = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    got = entropy_from_logits(logits, mask)
    assert got.item() == pytest.approx((h_uniform + h_skewed) / 2, abs=1e-6)


def test_mask_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="mask"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 2))
