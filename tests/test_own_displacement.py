"""OCC's `own_displacement` estimator: δ_MTP = logp_mtp − logp_old_mtp, the MTP head's log-probs at the
rollout weights coming from the same no-grad pass as logp_old."""

import pytest
import torch
from test_microbatch import RecordingEngine, _batch, _model

from mtp_occ.config import compose
from mtp_occ.regimes import build_regime
from mtp_occ.rl.occ import C_HAT, V2_HAT, occ_ratio, occ_sums
from mtp_occ.update import old_logprobs, rl_update


def test_sums_by_hand():
    logp = torch.tensor([[0.0, -1.0, -2.0]])
    old = torch.tensor([[0.0, -1.5, -2.0]])
    mtp = torch.tensor([[0.0, -3.0, -1.0]])
    old_mtp = torch.tensor([[0.0, -3.5, -1.5]])
    mask = torch.tensor([[False, True, True]])
    # δ_RL = [0.5, 0], δ′_MTP = [0.5, 0.5]: ĉ = 0.25, v̂² = 0.5; the paper's δ_MTP = [-1.5, 1]: ĉ = -0.75, v̂² = 3.25
    own = occ_sums(logp, mtp, old, mask, old_mtp_logprob_BT=old_mtp)
    paper = occ_sums(logp, mtp, old, mask)
    assert (float(own[C_HAT]), float(own[V2_HAT])) == pytest.approx((0.25, 0.5))
    assert (float(paper[C_HAT]), float(paper[V2_HAT])) == pytest.approx((-0.75, 3.25))
    assert occ_ratio(own, "own_displacement", eps=0.0)[0] == pytest.approx(0.5)


def _update(*extra):
    cfg = compose(["regime=occ", "regime.estimator=own_displacement", "algo.prompts_per_step=4",
                   "algo.group_size=2", "algo.updates_per_step=2", "algo.lr=1e-2", *extra])
    model, (batch, adv) = _model(), _batch()
    regime = build_regime(cfg.regime)
    assert regime.wants_old_mtp
    old = old_logprobs(model, batch, cfg.algo, 1.0, with_mtp=True)
    engine = RecordingEngine(model, cfg.algo, total_steps=cfg.steps)
    lams = []
    real = regime._lambda
    regime._lambda = lambda *a: (lambda r: (lams.append(r[0]), r)[1])(real(*a))
    res = rl_update(model, engine, regime, batch, old, adv, cfg.algo, coef_scale=1.0, temperature=1.0,
                    group_size=2)
    return model, batch, res.metrics, lams


def test_the_old_pass_stores_the_mtp_heads_own_log_probs():
    model, (batch, _) = _model(), _batch()
    old_logprobs(model, batch, 2, 1.0, with_mtp=True)
    with torch.no_grad():
        out = model.eval()(batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    assert torch.allclose(batch.old_mtp_logprob_BT, out.mtp_logprob_KBT[0], atol=1e-6)


def test_lambda_is_zero_at_the_first_update_and_not_after():
    """At update 0 neither head has moved: δ_RL = δ′_MTP = 0, so λ = 0 exactly (the paper's estimator is not
    0 there only through ε: its δ_MTP is the standing head gap). After one update both have moved."""
    _, _, m, lams = _update()
    assert len(lams) == 2 and lams[0] == 0.0 and lams[1] != 0.0
    assert m["occ/v2_hat"] > 0


@pytest.mark.parametrize("extra", [["algo.micro_batch_size=3"],
                                   ["algo.max_tokens_per_micro_batch=24", "rollout.max_prompt_len=8",
                                    "rollout.max_new_tokens=16"]])
def test_micro_batches_change_nothing(extra):
    _, _, ref, ref_l = _update()
    _, _, new, new_l = _update(*extra)
    assert new_l[1] == pytest.approx(ref_l[1], rel=1e-5)
    for k in ("occ/c_hat", "occ/v2_hat", "loss/mtp"):
        assert new[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-9), k


@pytest.mark.slow
def test_a_training_run_with_own_displacement(tmp_path):
    from test_train import _metrics, _run

    _, out = _run(tmp_path, "regime=occ", "regime.estimator=own_displacement", "name=own", "eval.enabled=false")
    rows = _metrics(tmp_path / "own")
    assert [r["step"] for r in rows] == [1, 2] and all(r["occ/lambda"] != 0.0 for r in rows)
    assert out["final_eval"] is None


def test_missing_rollout_time_mtp_log_probs_is_an_error_not_a_zero_lambda():
    import dataclasses

    from test_regimes import _inputs

    x = dataclasses.replace(_inputs(), old_mtp_logprob_BT=None)
    with pytest.raises(ValueError, match="with_mtp=True"):
        build_regime(compose(["regime=occ_own"]).regime).mtp_term(x)
