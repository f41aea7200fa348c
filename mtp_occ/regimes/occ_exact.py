"""`occ_exact`: the oracle for OCC. λ = λ₊ · schedule · c / (v² + ε) with c = ⟨g_RL, g_MTP⟩ and
v² = ‖g_MTP‖² from *exact* gradients over the shared parameters, at every optimizer update (not in the
paper, which only measured them offline). It is the control that says whether a proxy's λ (`occ` with any
`estimator`) is on the right scale; it costs one extra backward per micro-batch.

How an update runs (`mtp_occ.update.rl_update`, capability `exact_gradients`): per micro-batch the MTP
loss's gradient over every trainable parameter is taken with `torch.autograd.grad` (graph retained) and
accumulated here, and only `pg_loss` (plus any head-only term) is back-propagated into `.grad`. Before
clipping, with both all-reduced over ranks, `finish_update` forms c and v² over the shared parameters (the
MTP layers are not shared: their gradient is the MTP term's alone), fixes λ, and adds λ·g_MTP into every
parameter's `.grad`. The optimizer then sees exactly the gradient of `pg_loss + λ·mtp_loss`.

Options: `ema` over updates, `clamp` |λ|, `nonneg` (λ ≥ 0), and `c_from=previous`, which takes g_RL from
the *previous* update's mini-batch (an independent sample of the same policy, weights one update apart):
within one mini-batch ⟨g_RL, g_MTP⟩ also holds the two gradients' sampling covariance, across mini-batches
it estimates the population ⟨∇J, g_MTP⟩ the one-step gain needs. The first update of a run has no
previous mini-batch and uses its own. Needs `deepspeed=none` (ZeRO partitions the gradients) and
`diagnostics.every=0` (it logs the exact c, v² and cos itself); both are compose-time errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from mtp_occ.config import RegimeConfig, require
from mtp_occ.regimes import MtpTerm, MtpTermInputs, mtp_ce, mtp_policy_loss, register
from mtp_occ.rl.occ import shape_lambda


class CFrom(str, Enum):
    same = "same"  # g_RL of this update's mini-batch
    previous = "previous"  # g_RL of the previous update's mini-batch (population c)


@dataclass
class OccExactConfig(RegimeConfig):
    calibrated: ClassVar[bool] = True
    coef_keys: ClassVar[tuple[str, ...]] = ("lambda_plus",)
    exact_gradients: ClassVar[bool] = True

    name: str = "occ_exact"
    lambda_plus: float = 1.0  # λ₊: scale on the exact ratio c/v²
    eps: float = 1e-12
    ema: float = 0.0  # λ ← ema·λ_prev + (1−ema)·λ_t; 0 = off (state is checkpointed)
    clamp: float = 0.0  # |λ| <= clamp; 0 = no clamp
    nonneg: bool = False  # λ ≥ 0 (a negative c then turns the MTP term off instead of reversing it)
    c_from: CFrom = CFrom.same

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.eps > 0, "regime.eps", "must be > 0 (it keeps λ finite)")
        require(self.clamp >= 0, "regime.clamp", "must be >= 0 (0 = off)")
        require(0 <= self.ema < 1, "regime.ema", f"must be in [0, 1), got {self.ema}")

    def build(self) -> OccExactRegime:
        return OccExactRegime(self)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


class OccExactRegime:
    exact_gradients = True  # `rl_update` calls begin_update / add_mtp_gradient / finish_update

    def __init__(self, cfg: OccExactConfig):
        self.cfg, self.grad_path = cfg, cfg.grad_path
        self.ema_lambda: float | None = None
        self.prev_g_rl: list[torch.Tensor] | None = None
        self.metrics: dict[str, float] = {}

    def mtp_term(self, x: MtpTermInputs) -> MtpTerm:
        """The unscaled MTP policy loss; λ is fixed only at the end of the update (`finish_update`), so
        `lam` is 0 here and the MTP term is not part of the back-propagated loss."""
        loss, metrics = mtp_policy_loss(x)
        with torch.no_grad():
            metrics.update(mtp_ce(x)[1])
        self.coef_scale = x.coef_scale
        return MtpTerm(loss, 0.0, metrics)

    def begin_update(self, params: list[torch.nn.Parameter], shared: list[torch.nn.Parameter]) -> None:
        self.params, self.shared_ids = params, {id(p) for p in shared}
        self.g_mtp = [torch.zeros_like(p) for p in params]
        self.mtp_loss_sum, self.coef_scale = 0.0, 1.0

    def add_mtp_gradient(self, mtp_loss: torch.Tensor) -> None:
        """One micro-batch's ∇ mtp_loss over every trainable parameter (call before its backward)."""
        self.mtp_loss_sum += float(mtp_loss.detach())
        if not mtp_loss.requires_grad:
            return
        for acc, g in zip(self.g_mtp, torch.autograd.grad(mtp_loss, self.params, retain_graph=True,
                                                          allow_unused=True), strict=True):
            if g is not None:
                acc.add_(g)

    @torch.no_grad()
    def finish_update(self) -> dict[str, float]:
        """After the gradient all-reduce, before clipping: λ from exact c, v²; `.grad += λ·g_MTP`."""
        from mtp_occ.dist import all_reduce_

        for g in self.g_mtp:
            all_reduce_(g)
        pairs = [(p, g) for p, g in zip(self.params, self.g_mtp, strict=True) if id(p) in self.shared_ids]
        g_rl = [p.grad if p.grad is not None else torch.zeros_like(p) for p, _ in pairs]
        g_mtp = [g for _, g in pairs]
        v2, c_same, rl2 = _dot(g_mtp, g_mtp), _dot(g_rl, g_mtp), _dot(g_rl, g_rl)
        c = c_same
        if self.cfg.c_from is CFrom.previous and self.prev_g_rl is not None:
            c = _dot(self.prev_g_rl, g_mtp)
        if self.cfg.c_from is CFrom.previous:
            self.prev_g_rl = [g.detach().clone() for g in g_rl]
        lam = self._lambda(c / (v2 + self.cfg.eps))
        for p, g in zip(self.params, self.g_mtp, strict=True):
            if p.grad is None:
                p.grad = g.mul_(lam)
            else:
                p.grad.add_(g, alpha=lam)
        cos = c_same / math.sqrt(v2 * rl2) if v2 > 0 and rl2 > 0 else 0.0
        self.metrics = {"occ/lambda": lam, "mtp/lambda": lam, "occ/c": c, "occ/c_same": c_same, "occ/v2": v2,
                        "occ/cos": cos, "loss/mtp": lam * self.mtp_loss_sum}
        return self.metrics

    def _lambda(self, ratio: float) -> float:
        c = self.cfg
        lam, self.ema_lambda = shape_lambda(c.lambda_plus * self.coef_scale * ratio, clamp=c.clamp, ema=c.ema,
                                            prev=self.ema_lambda, nonneg=c.nonneg)
        return lam

    def state_dict(self) -> dict:
        return {"ema_lambda": self.ema_lambda, "prev_g_rl": self.prev_g_rl}

    def load_state_dict(self, state: dict) -> None:
        self.ema_lambda, self.prev_g_rl = state.get("ema_lambda"), state.get("prev_g_rl")


register(OccExactConfig())
