"""`occ`: Optimal Coefficient Calibration. The MTP head gets the main head's clipped policy loss with
λ_t = λ₊ · schedule · ĉ/(v̂² + ε), estimated per optimizer update from log-prob deltas over valid response
tokens (see `mtp_occ.rl.occ`). λ can be negative (λ* ∝ c/v² is); `clamp` bounds |λ| and `ema` smooths it.

With gradient accumulation (`algo.micro_batch_size` smaller than the mini-batch) ĉ and v̂² come from each
micro-batch alone, as in verl-based implementations; with the default (no accumulation) they come from
the whole mini-batch as in the paper. Only depth 1 enters the estimate; every depth gets the same λ.

`occ_compat` reproduces the released code: unmasked mean of per-token ratios, λ₊ = 0.1."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from mtp_occ.config import RegimeConfig, require
from mtp_occ.regimes import MtpTerm, MtpTermInputs, mtp_ce, mtp_policy_loss, register
from mtp_occ.rl.occ import occ_coefficient


class Estimator(str, Enum):
    ratio_of_sums = "ratio_of_sums"  # the paper: ĉ / (v̂² + ε)
    mean_of_ratios = "mean_of_ratios"  # the released code: mean_t δ_RL·δ_MTP / (δ_MTP² + ε)


@dataclass
class OccConfig(RegimeConfig):
    calibrated: ClassVar[bool] = True

    name: str = "occ"
    lambda_plus: float = 1.0  # λ₊: scale on the calibrated ratio (paper: 1.0)
    estimator: Estimator = Estimator.ratio_of_sums
    masked: bool = True  # False: average over padding too (the released code)
    eps: float = 1e-8
    clamp: float = 0.0  # |λ| <= clamp; 0 = no clamp
    ema: float = 0.0  # λ ← ema·λ_prev + (1−ema)·λ_t; 0 = off (state is checkpointed)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.lambda_plus >= 0, "regime.lambda_plus", f"must be >= 0, got {self.lambda_plus}")
        require(self.eps > 0, "regime.eps", "must be > 0 (it keeps λ finite)")
        require(self.clamp >= 0, "regime.clamp", "must be >= 0 (0 = off)")
        require(0 <= self.ema < 1, "regime.ema", f"must be in [0, 1), got {self.ema}")

    def build(self) -> OccRegime:
        return OccRegime(self)


class OccRegime:
    def __init__(self, cfg: OccConfig):
        self.cfg, self.grad_path = cfg, cfg.grad_path
        self.ema_lambda: float | None = None

    def coefficient(self, x: MtpTermInputs) -> tuple[float, dict[str, float]]:
        c = self.cfg
        mask_BT = x.mtp_rl_mask_KBT[0]
        ratio, c_hat, v2_hat = occ_coefficient(x.logprob_BT, x.mtp_logprob_KBT[0], x.old_logprob_BT, mask_BT,
                                               estimator=c.estimator.value, masked=c.masked, eps=c.eps)
        lam = c.lambda_plus * x.coef_scale * ratio
        if not math.isfinite(lam):  # only reachable with inf/nan log-probs; the loop counts the fault
            lam = 0.0
        if c.clamp > 0:
            lam = max(-c.clamp, min(c.clamp, lam))
        if c.ema > 0:
            lam = lam if self.ema_lambda is None else c.ema * self.ema_lambda + (1 - c.ema) * lam
            self.ema_lambda = lam
        valid_frac = float(mask_BT.float().mean())
        return lam, {"occ/lambda": lam, "occ/ratio": ratio, "occ/c_hat": c_hat, "occ/v2_hat": v2_hat,
                     "occ/valid_frac": valid_frac}

    def mtp_term(self, x: MtpTermInputs) -> MtpTerm:
        lam, metrics = self.coefficient(x)
        loss, m = mtp_policy_loss(x)
        with torch.no_grad():
            metrics.update(mtp_ce(x)[1])
        return MtpTerm(loss, lam, {**metrics, **m, "mtp/lambda": lam})

    def state_dict(self) -> dict:
        return {"ema_lambda": self.ema_lambda}

    def load_state_dict(self, state: dict) -> None:
        self.ema_lambda = state.get("ema_lambda")


register(OccConfig())
register(OccConfig(name="occ_compat", lambda_plus=0.1, estimator=Estimator.mean_of_ratios, masked=False))
