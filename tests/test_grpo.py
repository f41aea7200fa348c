"""GRPO/DAPO/GSPO math against hand-computed values."""

import math

import pytest
import torch

from mtp_occ.rl.grpo import (
    dynamic_sampling_keep_G,
    group_advantages,
    loss_denominator,
    overlong_penalty,
    policy_loss,
)


def test_group_advantages_unbiased_std_and_dr_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, group_size=4)
    s = 0.5 / math.sqrt(1.0 / 3.0)  # unbiased std of {1,0,0,1} is sqrt(1/3)
    assert torch.allclose(adv, torch.tensor([s, -s, -s, s, 0, 0, 0, 0]), atol=1e-5)
    adv_dr = group_advantages(r, group_size=4, norm_std=False)
    assert torch.allclose(adv_dr, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(5), group_size=2)


def _case():
    ratio = torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 20.0]])
    old = torch.zeros(2, 3)
    logprob = ratio.log().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return logprob, old, adv, mask


def test_token_level_clip_and_dual_clip_values():
    logprob, old, adv, mask = _case()
    # row 0 (A=+1): max(-1.5, -1.28) = -1.28 ; max(-0.5, -0.8) = -0.5
    # row 1 (A=-1): max(0.5, 0.8) = 0.8 ; max(1.5, 1.28) = 1.5 ; max(20, 1.28) = 20 -> dual cap 10
    loss, m = policy_loss(logprob, old, adv, mask)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5 + 10.0) / 5, abs=1e-5)
    assert m["clipfrac"] == pytest.approx(2 / 5)
    assert m["dual_clipfrac"] == pytest.approx(1 / 5)
    loss.backward()
    g = logprob.grad
    # d(-A r)/d logprob = -A r on unclipped tokens, 0 on clipped / dual-clipped / masked ones
    expected = torch.tensor([[0.0, -0.5, 0.0], [0.0, 1.5, 0.0]]) / 5
    assert torch.allclose(g, expected, atol=1e-6)


def test_aggregations():
    logprob, old, adv, mask = _case()
    l_sm, _ = policy_loss(logprob, old, adv, mask, agg="seq-mean-token-mean")
    assert l_sm.item() == pytest.approx(((-1.28 - 0.5) / 2 + (0.8 + 1.5 + 10) / 3) / 2, abs=1e-5)
    l_ss, _ = policy_loss(logprob, old, adv, mask, agg="seq-mean-token-sum")
    assert l_ss.item() == pytest.approx(((-1.28 - 0.5) + (0.8 + 1.5 + 10)) / 2, abs=1e-5)
    l_nodual, _ = policy_loss(logprob, old, adv, mask, dual_clip=0.0)
    assert l_nodual.item() == pytest.approx((-1.28 - 0.5 + 0.8 + 1.5 + 20.0) / 5, abs=1e-5)


def test_denom_makes_micro_batches_sum_to_the_mini_batch_loss():
    logprob, old, adv, mask = _case()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        full, _ = policy_loss(logprob, old, adv, mask, agg=agg)
        d = loss_denominator(mask, agg)
        parts = [policy_loss(logprob[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], agg=agg, denom=d)[0]
                 for i in range(2)]
        assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


def test_gspo_sequence_ratio():
    logprob = torch.tensor([[math.log(2.0), 0.0]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2)
    # s = exp(mean(log r)) = sqrt(2) = 1.41421 ; clipped at 1.28
    loss, m = policy_loss(logprob, old, adv, mask, level="sequence")
    assert loss.item() == pytest.approx(-1.28, abs=1e-5)
    loss2, _ = policy_loss(logprob, old, adv, mask, level="sequence", clip_high=0.5)
    assert loss2.item() == pytest.approx(-math.sqrt(2.0), abs=1e-5)
    loss2.backward()
    # token-level gradient of the sequence ratio: -A * s * (1) per token, / 2 tokens (token-mean)
    assert torch.allclose(logprob.grad, torch.full((1, 2), -math.sqrt(2.0) / 2), atol=1e-5)


def test_overlong_penalty_and_dynamic_sampling():
    lengths = torch.tensor([10, 96, 98, 100, 120])
    p = overlong_penalty(lengths, max_len=100, buffer=4, factor=1.0)
    assert torch.allclose(p, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert torch.equal(overlong_penalty(lengths, 100, 0), torch.zeros(5))
    keep = dynamic_sampling_keep_G(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), group_size=2)
    assert keep.tolist() == [False, True, False]
