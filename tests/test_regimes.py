"""Regime contract, parametrised over the registry: a new regime file is covered automatically."""

import pytest
import torch

from mtp_occ.config import compose
from mtp_occ.regimes import REGIME_CONFIGS, MtpTermInputs, build_regime
from mtp_occ.rl.grpo import loss_denominator, policy_loss
from mtp_occ.schedules import build_schedule


def _inputs(coef_scale=1.0, same_as_old=False):
    torch.manual_seed(0)
    B, T = 4, 6
    old = torch.randn(B, T) * 0.1 - 1.0
    logp = (old.clone() if same_as_old else old + 0.05 * torch.randn(B, T)).requires_grad_(True)
    mtp = (old + 0.1 * torch.randn(B, T)).unsqueeze(0).requires_grad_(True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, 0] = False
    mtp_mask = mask.unsqueeze(0).clone()
    mtp_mask[:, :, 1] = False
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def fn(lp, m, denom=None, adv_scale=1.0):
        return policy_loss(lp, old, adv * adv_scale, m, denom=denom)

    x = MtpTermInputs(logprob_BT=logp, old_logprob_BT=old, mtp_logprob_KBT=mtp, mtp_ce_mask_KBT=mtp_mask,
                      mtp_rl_mask_KBT=mtp_mask, mtp_tokens_K=[float(mtp_mask[0].sum())],
                      mtp_denom_K=[loss_denominator(mtp_mask[0], "token-mean")], policy_loss_fn=fn,
                      coef_scale=coef_scale, old_mtp_logprob_BT=(old + 0.07 * torch.randn(B, T)))
    return x


@pytest.mark.parametrize("name", sorted(REGIME_CONFIGS))
def test_contract(name):
    regime = build_regime(REGIME_CONFIGS[name])
    x = _inputs()
    t = regime.mtp_term(x)
    if REGIME_CONFIGS[name].exact_gradients:  # λ is fixed at the end of the update (tests/test_occ_exact.py)
        assert t.lam == 0.0 and "mtp/ce" in t.metrics and t.loss.ndim == 0 and torch.isfinite(t.loss)
        t.loss.backward()
        assert x.mtp_logprob_KBT.grad.abs().sum() > 0
        regime.load_state_dict(regime.state_dict())
        return
    term, metrics = t.lam * t.loss, t.metrics
    assert term.ndim == 0 and torch.isfinite(term)
    assert "mtp/lambda" in metrics and "mtp/ce" in metrics
    term.backward()
    assert x.mtp_logprob_KBT.grad is not None and x.mtp_logprob_KBT.grad.abs().sum() > 0
    # the schedule multiplier scales λ linearly
    half = build_regime(REGIME_CONFIGS[name]).mtp_term(_inputs(coef_scale=0.5)).lam
    assert half == pytest.approx(0.5 * t.lam, rel=1e-6) and t.lam == metrics["mtp/lambda"]
    # state round-trips
    regime.load_state_dict(regime.state_dict())


def test_occ_lambda_is_zero_when_logp_equals_logp_old():
    regime = build_regime(REGIME_CONFIGS["occ"])
    m = regime.mtp_term(_inputs(same_as_old=True)).metrics
    assert m["occ/lambda"] == 0.0


def test_occ_lambda_matches_the_estimator():
    from mtp_occ.rl.occ import occ_coefficient

    x = _inputs()
    m = build_regime(REGIME_CONFIGS["occ"]).mtp_term(x).metrics
    ratio, c, v2 = occ_coefficient(x.logprob_BT, x.mtp_logprob_KBT[0], x.old_logprob_BT, x.mtp_rl_mask_KBT[0])
    assert m["occ/lambda"] == pytest.approx(ratio) and m["occ/c_hat"] == pytest.approx(c)


def test_occ_clamp_and_ema_state():
    cfg = compose(["regime=occ", "regime.clamp=0.01", "regime.ema=0.5"]).regime
    regime = build_regime(cfg)
    m1 = regime.mtp_term(_inputs()).metrics
    assert abs(m1["occ/lambda"]) <= 0.01
    state = regime.state_dict()
    again = build_regime(cfg)
    again.load_state_dict(state)
    assert again.mtp_term(_inputs()).lam == regime.mtp_term(_inputs()).lam


def _negative_lambda_inputs():
    """δ_RL and δ_MTP of opposite signs (λ < 0), MTP log-ratios of ±0.5 (outside the clip range)."""
    x = _inputs()
    sign = torch.where(torch.arange(x.old_logprob_BT.numel()).view_as(x.old_logprob_BT) % 2 == 0, 1.0, -1.0)
    x.logprob_BT = (x.old_logprob_BT - 0.05 * sign).requires_grad_(True)
    x.mtp_logprob_KBT = (x.old_logprob_BT + 0.5 * sign).unsqueeze(0).requires_grad_(True)
    return x


def test_occ_compat_scales_the_advantages_and_occ_the_loss():
    x = _negative_lambda_inputs()
    old, adv, mask = x.old_logprob_BT, torch.tensor([1.0, -1.0, 0.5, -0.5]), x.mtp_rl_mask_KBT[0]
    denom = x.mtp_denom_K[0]
    compat = build_regime(REGIME_CONFIGS["occ_compat"]).mtp_term(x)
    lam = compat.lam
    assert lam < 0 and compat.metrics["mtp/lambda"] == lam
    l_scaled_adv = policy_loss(x.mtp_logprob_KBT[0], old, lam * adv, mask, denom=denom)[0]  # L(λ·A)
    l_scaled_loss = lam * policy_loss(x.mtp_logprob_KBT[0], old, adv, mask, denom=denom)[0]  # λ·L(A)
    assert abs((l_scaled_adv - l_scaled_loss).item()) > 0.1 * abs(l_scaled_loss.item())  # they clip differently
    assert (compat.lam * compat.loss).item() == pytest.approx(l_scaled_adv.item(), rel=1e-6)
    occ = build_regime(REGIME_CONFIGS["occ"]).mtp_term(_negative_lambda_inputs())
    ref = occ.lam * policy_loss(x.mtp_logprob_KBT[0], old, adv, mask, denom=denom)[0]
    assert occ.lam < 0 and (occ.lam * occ.loss).item() == pytest.approx(ref.item(), rel=1e-6)
    # λ ≥ 0: the two forms agree (the clipped surrogate is positively homogeneous in A)
    pos = build_regime(REGIME_CONFIGS["occ_compat"]).mtp_term(_inputs())
    assert pos.lam > 0
    assert (pos.lam * pos.loss).item() == pytest.approx(
        policy_loss(_inputs().mtp_logprob_KBT[0], old, pos.lam * adv, mask, denom=denom)[0].item(), rel=1e-6)


def test_occ_one_lambda_per_update_fixes_lambda_and_steps_the_ema_once():
    from mtp_occ.rl.occ import occ_ratio

    cfg = compose(["regime=occ", "regime.ema=0.5"]).regime
    assert cfg.lambda_per.value == "update" and REGIME_CONFIGS["occ_compat"].lambda_per.value == "micro_batch"
    x = _inputs()
    regime = build_regime(cfg)
    assert regime.wants_update_statistics
    sums = regime.statistics(x)
    regime.begin_update(sums * 2.0, coef_scale=0.5)  # e.g. two halves of a mini-batch, summed
    expect = 0.5 * occ_ratio(sums * 2.0)[0]
    lams = [regime.mtp_term(_inputs()).lam for _ in range(3)]  # three micro-batches
    assert lams == [pytest.approx(expect)] * 3 and regime.ema_lambda == pytest.approx(expect)
    regime.begin_update(None)  # back to λ from each call's own inputs
    assert regime.mtp_term(_inputs()).lam == pytest.approx(0.5 * expect + 0.5 * occ_ratio(sums)[0])
    per_micro = build_regime(compose(["regime=occ", "regime.lambda_per=micro_batch"]).regime)
    assert not per_micro.wants_update_statistics


@pytest.mark.parametrize("name, p, expected", [
    ("constant", 0.7, 1.0), ("linear", 0.25, 0.75), ("cosine", 0.5, 0.5),
    ("warmup_then_constant", 0.05, 0.5), ("warmup_then_constant", 0.5, 1.0), ("step", 0.6, 0.1), ("step", 0.4, 1.0),
])
def test_schedules(name, p, expected):
    f = build_schedule(compose([f"coef_schedule={name}"]).coef_schedule)
    assert f(p) == pytest.approx(expected)


NEW_REGIME = '''"""`half_ce`: ce with half the coefficient (a regime written for a test, in one file)."""

from dataclasses import dataclass
from typing import ClassVar

from mtp_occ.config import RegimeConfig
from mtp_occ.regimes import MtpTerm, Stateless, mtp_ce, register


@dataclass
class HalfCeConfig(RegimeConfig):
    coef_keys: ClassVar[tuple[str, ...]] = ("mu",)
    name: str = "half_ce"
    mu: float = 0.2

    def build(self):
        return HalfCe(self)


class HalfCe(Stateless):
    def __init__(self, cfg):
        self.cfg, self.grad_path = cfg, cfg.grad_path

    def mtp_term(self, x):
        loss, metrics = mtp_ce(x)
        lam = 0.5 * self.cfg.mu * x.coef_scale
        return MtpTerm(loss, lam, {**metrics, "mtp/lambda": lam})


register(HalfCeConfig())
'''


@pytest.mark.slow
def test_a_new_regime_is_one_file_and_nothing_else(tmp_path):
    """Write a regime module into a copy of the package, touch nothing else, and train with it."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from test_train import TINY

    repo = Path(__file__).resolve().parent.parent
    copy = tmp_path / "copy"
    shutil.copytree(repo / "mtp_occ", copy / "mtp_occ", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "conf", copy / "conf")
    (copy / "mtp_occ" / "regimes" / "half_ce.py").write_text(NEW_REGIME)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(copy)}
    probe = subprocess.run([sys.executable, "-c", "import mtp_occ, mtp_occ.regimes as r; print(mtp_occ.__file__);"
                            "print(r.coefficient_keys('half_ce'), r.is_calibrated('half_ce'))"],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.splitlines() == [str(copy / "mtp_occ" / "__init__.py"), "('mu',) False"]
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", *TINY, "steps=1", "eval.enabled=false",
                        "regime=half_ce", "regime.mu=0.4", f"run_root={tmp_path / 'runs'}"],
                       cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("regime=half_ce,regime.mu=0.4")  # its coefficient key names the run early
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["mtp/lambda"] == pytest.approx(0.2) and row["loss/mtp"] != 0.0
    bad = subprocess.run([sys.executable, "-m", "mtp_occ.run", "regime=half_ce", "regime.lam=1", "dry_run=true"],
                         cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "lam" in bad.stderr  # a key the regime does not declare is refused


def test_a_regime_config_without_build_is_refused_at_registration():
    from dataclasses import dataclass

    from mtp_occ.config import RegimeConfig
    from mtp_occ.regimes import register

    @dataclass
    class NoBuild(RegimeConfig):
        name: str = "no_build"

    with pytest.raises(TypeError, match="must define build"):
        register(NoBuild())


def test_regime_lam_is_unknown_under_occ():
    """OCC's coefficient is `lambda_plus`; a fixed-λ key on it used to be accepted and ignored."""
    from hydra.errors import ConfigCompositionException

    from mtp_occ.config import ConfigError

    with pytest.raises(ConfigCompositionException, match="regime.lam"):
        compose(["regime=occ", "regime.lam=5"])
    with pytest.raises(ConfigError, match="regime.lam.*unknown key.*lambda_plus"):
        compose(["regime=occ", "+regime.lam=5"])
    assert compose(["regime=policy", "regime.lam=5"]).regime.lam == 5
