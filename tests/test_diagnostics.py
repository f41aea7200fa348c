"""Exact decomposition diagnostics: they never change training, and c, v² equal a brute-force computation
from separate backward passes."""

import copy

import pytest
import torch

from mtp_occ.config import ConcatOrder, ModelConfig, compose
from mtp_occ.engine import TorchEngine
from mtp_occ.model.load import build_tiny
from mtp_occ.regimes import MtpTermInputs, build_regime
from mtp_occ.rl.grpo import loss_denominator, policy_loss
from mtp_occ.rollout.hf import RolloutBatch
from mtp_occ.update import old_logprobs, rl_update

V, B, P, R = 23, 8, 4, 6


def _setup(regime: str, updates: int):
    cfg = compose([f"regime={regime}", "algo.prompts_per_step=4", "algo.group_size=2",
                   f"algo.updates_per_step={updates}", "algo.lr=1e-2"])
    model = build_tiny(ModelConfig(name="t", hidden_size=32, num_heads=4, intermediate_size=64,
                                   concat_order=ConcatOrder.hidden_first), V, 0, 1, 2, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (B, P + R), generator=g)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, P:] = 1
    batch = RolloutBatch(ids, attn, resp, resp.sum(1), torch.zeros(B, dtype=torch.bool), torch.arange(B) // 2,
                         [""] * B, 0)
    adv = torch.randn(B, generator=g)
    return cfg, model, batch, adv


def _update(cfg, model, batch, adv, diagnose):
    old = old_logprobs(model, batch, 0, 1.0)
    engine = TorchEngine(model, cfg.algo, total_steps=cfg.steps)
    res = rl_update(model, engine, build_regime(cfg.regime), batch, old, adv, cfg.algo, coef_scale=1.0,
                    temperature=1.0, group_size=2, diagnose=diagnose)
    return res.metrics


@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_diagnostics_do_not_change_the_update(regime):
    cfg, model, batch, adv = _setup(regime, updates=2)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _update(cfg, a, batch, adv, diagnose=False)
    m = _update(cfg, b, batch, adv, diagnose=True)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), k
    assert {"diag/c", "diag/v2", "diag/cos", "diag/c_hat", "diag/v2_hat"} <= set(m)
    if regime == "detach":  # no MTP gradient reaches a shared parameter
        assert m["diag/c"] == 0.0 and m["diag/v2"] == 0.0


def test_exact_c_and_v2_match_separate_backward_passes():
    cfg, model, batch, adv = _setup("policy", updates=1)  # one update: diagnostics on it
    ref = copy.deepcopy(model)
    m = _update(cfg, model, batch, adv, diagnose=True)
    # brute force on the untouched copy: ∇ pg and ∇ (unscaled) MTP loss, separately, over shared params
    old = old_logprobs(ref, batch, 0, 1.0)
    out = ref(batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    pg, _ = policy_loss(out.logprob_BT, old, adv, out.loss_mask_BT)
    x = MtpTermInputs(out.logprob_BT, old, out.mtp_logprob_KBT, out.mtp_ce_mask_KBT, out.mtp_rl_mask_KBT,
                      [float(out.mtp_ce_mask_KBT[0].sum())], [loss_denominator(out.mtp_rl_mask_KBT[0], "token-mean")],
                      lambda lp, mk, denom=None: policy_loss(lp, old, adv, mk, denom=denom), 1.0)
    mtp_loss = build_regime(cfg.regime).mtp_term(x).loss
    shared = list(ref.lm.parameters())
    g_rl = torch.autograd.grad(pg, shared, retain_graph=True, allow_unused=True)
    g_mtp = torch.autograd.grad(mtp_loss, shared, allow_unused=True)
    z = torch.zeros(())
    c = sum(float(((a if a is not None else z).double() * (b if b is not None else z).double()).sum())
            for a, b in zip(g_rl, g_mtp, strict=True))
    v2 = sum(float(b.double().square().sum()) for b in g_mtp if b is not None)
    assert m["diag/v2"] == pytest.approx(v2, rel=1e-4)
    assert m["diag/c"] == pytest.approx(c, rel=1e-3, abs=1e-8)


def test_per_update_rows_and_the_cross_mini_batch_c():
    """Every update gets its own row; update u's `diag/c_cross` is ⟨g_RL of update u−1, g_MTP of update u⟩,
    checked against the rows' own g_RL kept by the decomposition; the step mean skips update 0 as before."""
    from mtp_occ.rl.diagnostics import Decomposition

    seen = []
    real_init = Decomposition.__init__

    def spy(self, params, prev_g_rl=None):
        real_init(self, params, prev_g_rl)
        seen.append(self)

    cfg, model, batch, adv = _setup("policy", updates=2)
    old = old_logprobs(model, batch, 0, 1.0)
    engine = TorchEngine(model, cfg.algo, total_steps=cfg.steps)
    Decomposition.__init__ = spy
    try:
        res = rl_update(model, engine, build_regime(cfg.regime), batch, old, adv, cfg.algo, coef_scale=1.0,
                        temperature=1.0, group_size=2, diagnose=True)
    finally:
        Decomposition.__init__ = real_init
    rows = res.per_update
    assert len(rows) == 2 and "diag/c_cross" not in rows[0] and "diag/c_cross" in rows[1]
    want = sum(float((a.double() * b.double()).sum()) for a, b in zip(seen[0].g_rl, seen[1].g_mtp, strict=True))
    assert rows[1]["diag/c_cross"] == pytest.approx(want, rel=1e-5)
    assert rows[1]["diag/c"] != rows[1]["diag/c_cross"]
    assert res.metrics["diag/c"] == rows[1]["diag/c"]  # the step's mean: the updates after the first


def test_diagnostics_jsonl_is_one_row_per_update_and_resume_truncates_it(tmp_path):
    from mtp_occ.log import RunLogger
    from mtp_occ.rundir import RunDir

    logger = RunLogger(tmp_path, config={}, name="d", mode="disabled")
    logger.log_updates([{"diag/c": 1.0}, {"diag/c": -2.0}], step=1)
    logger.log_updates([{"diag/c": 3.0}], step=2)
    logger.finish()
    import json

    rows = [json.loads(line) for line in RunDir(tmp_path).diagnostics.read_text().splitlines()]
    assert [(r["step"], r["update"], r["diag/c"]) for r in rows] == [(1, 0, 1.0), (1, 1, -2.0), (2, 0, 3.0)]
    RunLogger(tmp_path, config={}, name="d", mode="disabled", resume_step=1).finish()
    rows = [json.loads(line) for line in RunDir(tmp_path).diagnostics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1]
