"""`occ_exact`: λ from exact gradients at every update. The optimizer must see exactly the gradient of
`pg_loss + λ·mtp_loss` (checked against `policy` run with that λ), and c, v² must be the exact
decomposition's (checked against the diagnostics of that same run)."""

import pytest
import torch
from test_microbatch import _batch, _model

from mtp_occ.config import compose
from mtp_occ.engine import TorchEngine
from mtp_occ.regimes import build_regime
from mtp_occ.update import old_logprobs, rl_update


class AfterHookEngine(TorchEngine):
    """Records the gradients the optimizer is handed: after the hook, before clipping."""

    def __init__(self, model, algo, *, total_steps):
        super().__init__(model, algo, total_steps=total_steps)
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self, finite, before_clip=None):
        def hook():
            if before_clip is not None:
                before_clip()
            self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        return super().step(finite, hook)


def _update(regime, *extra, updates=1, diagnose=False):
    cfg = compose([f"regime={regime}", "algo.prompts_per_step=4", "algo.group_size=2",
                   f"algo.updates_per_step={updates}", "algo.lr=1e-9", *extra])
    model, (batch, adv) = _model(), _batch()
    old = old_logprobs(model, batch, cfg.algo, 1.0)
    old = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    engine = AfterHookEngine(model, cfg.algo, total_steps=cfg.steps)
    reg = build_regime(cfg.regime)
    res = rl_update(model, engine, reg, batch, old, adv, cfg.algo, coef_scale=1.0, temperature=1.0,
                    group_size=2, diagnose=diagnose)
    return reg, res.metrics, engine.grads


@pytest.mark.parametrize("extra", [[], ["algo.micro_batch_size=3"]])
def test_the_update_is_policy_with_the_exact_lambda(extra):
    _, m, g = _update("occ_exact", *extra)
    lam = m["occ/lambda"]
    assert lam != 0.0 and lam == pytest.approx(m["occ/c"] / m["occ/v2"], rel=1e-9)
    _, ref_m, ref_g = _update("policy", f"regime.lam={lam!r}", *extra, diagnose=True)
    assert m["loss/mtp"] == pytest.approx(ref_m["loss/mtp"], rel=1e-5)
    assert m["occ/c"] == pytest.approx(ref_m["diag/c"], rel=1e-4) and m["occ/v2"] == pytest.approx(ref_m["diag/v2"], rel=1e-5)
    for n in ref_g[0]:
        assert torch.allclose(g[0][n], ref_g[0][n], atol=1e-7, rtol=1e-4), n


def test_c_from_previous_uses_the_previous_updates_g_rl():
    seen = []
    reg, _, _ = _update("occ_exact", "regime.c_from=previous", updates=2)
    # replay: the regime keeps the last update's g_RL; the second update's c differs from its own c_same
    assert reg.prev_g_rl is not None
    real = type(reg).finish_update

    def spy(self):
        out = real(self)
        seen.append(dict(out))
        return out

    type(reg).finish_update = spy
    try:
        _update("occ_exact", "regime.c_from=previous", updates=2)
    finally:
        type(reg).finish_update = real
    assert seen[0]["occ/c"] == seen[0]["occ/c_same"]  # the run's first update has no previous mini-batch
    assert seen[1]["occ/c"] != seen[1]["occ/c_same"]


def test_nonneg_clamp_and_ema():
    reg = build_regime(compose(["regime=occ_exact", "regime.nonneg=true", "regime.clamp=0.5"]).regime)
    reg.coef_scale = 1.0
    assert reg._lambda(-2.0) == 0.0 and reg._lambda(3.0) == 0.5 and reg._lambda(0.2) == pytest.approx(0.2)
    ema = build_regime(compose(["regime=occ_exact", "regime.ema=0.5"]).regime)
    ema.coef_scale = 1.0
    assert ema._lambda(1.0) == 1.0 and ema._lambda(0.0) == 0.5
