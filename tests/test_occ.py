"""The OCC estimators on a 2x3 example worked by hand."""

import pytest
import torch

from mtp_occ.rl.occ import occ_coefficient

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


def test_mean_of_ratios_masked_vs_unmasked_differ_by_valid_fraction():
    # per-token δ_RL/δ_MTP: 0.5, -2, -1, 1 -> mean -0.375 (negative: λ* can be < 0)
    masked, _, _ = occ_coefficient(LOGP, MTP, OLD, MASK, estimator="mean_of_ratios")
    unmasked, _, _ = occ_coefficient(LOGP, MTP, OLD, MASK, estimator="mean_of_ratios", masked=False)
    assert masked == pytest.approx(-0.375, rel=1e-5)
    assert unmasked == pytest.approx(-0.375 * 4 / 6, rel=1e-5)


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
