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


def test_group_advantages_of_an_all_equal_group_are_exactly_zero():
    # float32 mean of sixteen 0.7s is an ulp off; the std ~0 plus eps used to turn that into 0.0561
    assert torch.equal(group_advantages(torch.full((16,), 0.7), 16), torch.zeros(16))
    r = torch.cat([torch.full((16,), 0.7), torch.arange(16.0)])
    adv = group_advantages(r, 16)
    assert torch.equal(adv[:16], torch.zeros(16)) and adv[16:].abs().min() > 0


def test_dapo_overlong_penalty_matches_verl_scale():
    # [correct-short, correct-overlong, wrong-short, wrong-overlong], 1/0 scores, factor 1.0
    score = torch.tensor([1.0, 1.0, 0.0, 0.0])
    lengths = torch.tensor([10, 120, 10, 120])
    ours = group_advantages(score + overlong_penalty(lengths, max_len=100, buffer=4, factor=1.0), 4)
    verl = group_advantages(2 * score - 1 + overlong_penalty(lengths, 100, 4, 1.0, score_span=2.0), 4)
    assert torch.allclose(verl, torch.tensor([1.1619, 0.3873, -0.3873, -1.1619]), atol=1e-4)
    assert torch.allclose(ours, verl, atol=1e-5)  # was [1.22, 0, 0, -1.22]


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


def test_gspo_averages_raw_log_ratios_then_clamps_the_sequence_ratio_as_verl():
    # logp - old = [-30, 0], A = +1: verl's sequence log-ratio is -15 (no token clamp), clamped at max 10
    logprob = torch.tensor([[-30.0, 0.0]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2)
    loss, _ = policy_loss(logprob, old, adv, mask, clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean",
                          level="sequence")
    loss.backward()
    s = math.exp(-15.0)  # the token-clamped mean (-10) gave exp(-10), 148x this
    assert loss.item() == pytest.approx(-s, rel=1e-5)
    assert torch.allclose(logprob.grad, torch.full((1, 2), -s / 2), rtol=1e-5)
    # the sequence log-ratio is clamped at 10 (not 20), and a clamped entry passes no gradient
    up = torch.tensor([[30.0, 0.0]], requires_grad=True)
    loss_up, m = policy_loss(up, old, -adv, mask, level="sequence")
    assert loss_up.item() == pytest.approx(math.exp(10.0), rel=1e-5) and m["ratio_mean"] == pytest.approx(math.exp(10.0), rel=1e-5)
    loss_up.backward()
    assert torch.equal(up.grad, torch.zeros(1, 2))


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
    assert torch.allclose(p, torch.tensor([0.0, 0.0, -0.25, -0.5, -0.5]))  # half: our scores span 1
    assert torch.equal(overlong_penalty(lengths, 100, 0), torch.zeros(5))
    assert torch.allclose(overlong_penalty(lengths, 100, 4, factor=1.0, score_span=2.0),
                          torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    keep = dynamic_sampling_keep_G(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), group_size=2)
    assert keep.tolist() == [False, True, False]
