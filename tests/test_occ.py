"""The OCC estimators on a 2x3 example worked by hand."""

import pytest
import torch

from mtp_occ.rl.occ import ESTIMATORS, occ_coefficient, occ_ratio, occ_sums, response_slice_positions

OLD = torch.zeros(2, 3)
LOGP = torch.tensor([[0.1, 0.2, 0.0], [-0.1, 0.3, 0.5]])
MTP = torch.tensor([[0.2, -0.1, 0.0], [0.1, 0.3, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 0]])
# valid (δ_RL, δ_MTP): (0.1, 0.2) (0.2, -0.1) (-0.1, 0.1) (0.3, 0.3)
C_HAT = 0.02 - 0.02 - 0.01 + 0.09  # 0.08
V2_HAT = 0.04 + 0.01 + 0.01 + 0.09  # 0.15


def test_ratio_of_sums():
    ratio, c, v2 = occ_coefficient(LOGP, MTP, OLD, MASK)
    assert c == pytest.approx(C_HAT)
    assert v2 == pytest.approx(V2_HAT)
    assert ratio == pytest.approx(C_HAT / (V2_HAT + 1e-8))


def test_mean_of_ratios_masked_vs_unmasked_over_the_response_slice():
    # per-token δ_RL/δ_MTP: 0.5, -2, -1, 1 -> mean -0.375 (negative: λ* can be < 0)
    masked, _, _ = occ_coefficient(LOGP, MTP, OLD, MASK, estimator="mean_of_ratios")
    assert masked == pytest.approx(-0.375, rel=1e-5)
    # the response slice of MASK starts at column 0: R = T - 1 = 2, B·R = 4 = the valid tokens here
    unmasked, _, _ = occ_coefficient(LOGP, MTP, OLD, MASK, estimator="mean_of_ratios", masked=False)
    assert unmasked == pytest.approx(-0.375, rel=1e-5)


def test_unmasked_mean_of_ratios_divides_by_the_response_slice_as_the_released_code():
    # P=3 prompt tokens, R=4 response tokens (T=7, prediction-aligned response positions 2..5), two valid
    # tokens with per-token ratios 0.5 and 1.0: the released code averages over B·R = 4 -> 0.375 (every
    # position of the tensor, 7, gave 0.214)
    old = torch.zeros(1, 7)
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.1, 0.2, 0.0, 0.0]])
    mtp = torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.2, 0.0, 0.0]])
    rl_mask = torch.tensor([[0, 0, 0, 1, 1, 0, 0]])  # MTP-valid tokens
    slice_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0]])  # the main head's response positions
    assert response_slice_positions(slice_mask) == 4.0
    ratio, _, _ = occ_coefficient(logp, mtp, old, rl_mask, estimator="mean_of_ratios", masked=False,
                                  slice_mask_BT=slice_mask)
    assert ratio == pytest.approx(1.5 / 4, rel=1e-5)
    masked, _, _ = occ_coefficient(logp, mtp, old, rl_mask, estimator="mean_of_ratios")
    assert masked == pytest.approx(1.5 / 2, rel=1e-5)
    assert response_slice_positions(torch.zeros(2, 5)) == 0.0


def test_sums_over_parts_add_up_to_the_whole():
    whole = occ_sums(LOGP, MTP, OLD, MASK)
    parts = occ_sums(LOGP[:1], MTP[:1], OLD[:1], MASK[:1]) + occ_sums(LOGP[1:], MTP[1:], OLD[1:], MASK[1:])
    assert torch.allclose(parts, whole)
    for est in ESTIMATORS:
        for masked in (True, False):
            assert occ_ratio(parts, est, masked) == pytest.approx(
                occ_coefficient(LOGP, MTP, OLD, MASK, estimator=est, masked=masked))


def test_masked_positions_are_ignored_and_first_update_gives_zero():
    garbage = MTP.clone()
    garbage[:, 2] = 1e4
    assert occ_coefficient(LOGP, garbage, OLD, MASK)[0] == pytest.approx(C_HAT / V2_HAT)
    ratio, c, _ = occ_coefficient(OLD, MTP, OLD, MASK)  # logp == logp_old: δ_RL = 0
    assert ratio == 0.0 and c == 0.0


def test_negative_sign():
    ratio, c, _ = occ_coefficient(-LOGP, MTP, OLD, MASK)
    assert c < 0 and ratio < 0


def test_bad_estimator_named():
    with pytest.raises(ValueError, match="ratio_of_sums"):
        occ_coefficient(LOGP, MTP, OLD, MASK, estimator="nope")
