"""`occ`: Optimal Coefficient Calibration. The MTP head gets the main head's clipped policy loss with
λ_t = λ₊ · schedule · ĉ/(v̂² + ε), estimated per optimizer update from log-prob deltas over valid response
tokens (see `mtp_occ.rl.occ`). λ can be negative (λ* ∝ c/v² is); `clamp` bounds |λ| and `ema` smooths it.

`lambda_per` says over what λ (and its EMA) is estimated:
- `update` (default): one λ per optimizer update, from the whole mini-batch on every rank, as the paper
  defines it; gradient accumulation (`algo.micro_batch_size`, `algo.max_tokens_per_micro_batch`) then
  changes nothing. With one micro-batch per mini-batch λ comes from that micro-batch's own forward; with
  several, `rl_update` first runs a no-grad forward (main and MTP heads) over the mini-batch's
  micro-batches and hands the summed, all-reduced sums to `begin_update` (λ must be known before the
  first micro-batch's backward). That pass costs about one extra forward of the mini-batch, roughly a
  third of its forward + backward, and only runs when the update accumulates.
  Under `masked=False` the response slice is that of the tensors each micro-batch holds, so a token
  budget (which trims all-padding columns) still changes that estimator's denominator.
- `micro_batch`: ĉ and v̂² from each micro-batch alone and the EMA stepped per micro-batch, as the
  released (verl-based) code does.
Only depth 1 enters the estimate; every depth gets the same λ.

`estimator`: `ratio_of_sums` (the paper), `mean_of_ratios` (the released code), or `own_displacement`
(not in the paper): ĉ/(v̂²+ε) with δ_MTP measured from the MTP head's own log-probs at the rollout weights,
which the old-log-prob pass then computes too (`wants_old_mtp`); see `mtp_occ.rl.occ` for why.

`lambda_on` says where λ enters the loss. `occ` uses `loss`: λ·L_MTP(A), the paper's L_RL + λ·L_MTP,
whose gradient is λ·g_MTP along a direction that does not depend on λ, the quantity c/v² calibrates.
`advantages` is the released code's L_MTP(λ·A): the clipped surrogate is positively homogeneous in A,
so this equals λ·L_MTP(A) for λ ≥ 0 but |λ|·L_MTP(−A) for λ < 0, which clips on the other side of the
trust region. It is implemented exactly as `MtpTerm(loss = s·L_MTP(s·A), lam = λ)` with s = sign(λ), so
`lam · loss` is L_MTP(λ·A) and `lam` stays the signed λ.

`occ_own` is `occ` with `estimator=own_displacement` (a name, so that a sweep can list it beside the
others). `occ_compat` reproduces the released code: unmasked mean of per-token ratios over the response slice,
λ₊ = 0.1, λ per micro-batch, λ scaling the advantages."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch

from mtp_occ.config import RegimeConfig, require
from mtp_occ.regimes import MtpTerm, MtpTermInputs, mtp_ce, mtp_policy_loss, register
from mtp_occ.rl.occ import POSITIONS, VALID, all_reduce_sum_, occ_ratio, occ_sums, shape_lambda


class LambdaPer(str, Enum):
    update = "update"  # one λ per optimizer update over the whole mini-batch (the paper)
    micro_batch = "micro_batch"  # one λ per micro-batch (the released code)


class LambdaOn(str, Enum):
    loss = "loss"  # λ·L_MTP(A) (the paper)
    advantages = "advantages"  # L_MTP(λ·A) (the released code)


class Estimator(str, Enum):
    ratio_of_sums = "ratio_of_sums"  # the paper: ĉ / (v̂² + ε)
    mean_of_ratios = "mean_of_ratios"  # the released code: mean_t δ_RL·δ_MTP / (δ_MTP² + ε)
    own_displacement = "own_displacement"  # ĉ/(v̂²+ε) with δ_MTP = logp_mtp − logp_old_mtp (see `rl.occ`)


@dataclass
class OccConfig(RegimeConfig):
    calibrated: ClassVar[bool] = True
    coef_keys: ClassVar[tuple[str, ...]] = ("lambda_plus",)

    name: str = "occ"
    lambda_plus: float = 1.0  # λ₊: scale on the calibrated ratio (paper: 1.0)
    estimator: Estimator = Estimator.ratio_of_sums
    masked: bool = True  # False: average over the response slice, padding included (the released code)
    lambda_per: LambdaPer = LambdaPer.update
    lambda_on: LambdaOn = LambdaOn.loss
    eps: float = 1e-8
    clamp: float = 0.0  # |λ| <= clamp; 0 = no clamp
    ema: float = 0.0  # λ ← ema·λ_prev + (1−ema)·λ_t; 0 = off (state is checkpointed)

    def __post_init__(self) -> None:
        super().__post_init__()  # λ₊ >= 0
        require(self.eps > 0, "regime.eps", "must be > 0 (it keeps λ finite)")
        require(self.clamp >= 0, "regime.clamp", "must be >= 0 (0 = off)")
        require(0 <= self.ema < 1, "regime.ema", f"must be in [0, 1), got {self.ema}")

    def build(self) -> OccRegime:
        return OccRegime(self)


class OccRegime:
    def __init__(self, cfg: OccConfig):
        self.cfg, self.grad_path = cfg, cfg.grad_path
        self.ema_lambda: float | None = None
        self._update: tuple[float, dict[str, float]] | None = None  # (λ, metrics) fixed for this update

    @property
    def wants_update_statistics(self) -> bool:
        """True when λ is one per update: `rl_update` then calls `begin_update` before each update."""
        return self.cfg.lambda_per is LambdaPer.update

    @property
    def wants_old_mtp(self) -> bool:
        """True when δ_MTP is the head's own displacement: the old-log-prob pass then runs the MTP layers."""
        return self.cfg.estimator is Estimator.own_displacement

    def statistics(self, x: MtpTermInputs) -> torch.Tensor:
        """This (micro-)batch's local `occ_sums` (depth 1); sums over micro-batches and ranks add up."""
        old_mtp = None
        if self.wants_old_mtp:
            old_mtp = x.old_mtp_logprob_BT
            if old_mtp is None:  # only a masked-out stand-in row may come without (its δ_MTP is 0 either way)
                if x.mtp_rl_mask_KBT[0].any():
                    raise ValueError(f"regime={self.cfg.name} (estimator=own_displacement) needs the MTP head's "
                                     "rollout-time log-probs: old_logprobs(..., with_mtp=True)")
                old_mtp = x.mtp_logprob_KBT[0]
        return occ_sums(x.logprob_BT, x.mtp_logprob_KBT[0], x.old_logprob_BT, x.mtp_rl_mask_KBT[0],
                        self.cfg.eps, slice_mask_BT=x.mtp_ce_mask_KBT[0], old_mtp_logprob_BT=old_mtp)

    def begin_update(self, sums: torch.Tensor | None, coef_scale: float = 1.0) -> None:
        """Fix λ for the coming update from the mini-batch's summed (all-ranks) `statistics`; `None`
        (one micro-batch: λ comes from its own forward) clears it."""
        if sums is None:
            self._update = None
            return
        valid_frac = float(sums[VALID]) / max(float(sums[POSITIONS]), 1.0)
        self._update = self._lambda(occ_ratio(sums, self.cfg.estimator.value, self.cfg.masked, self.cfg.eps),
                                    coef_scale, valid_frac)

    def coefficient(self, x: MtpTermInputs) -> tuple[float, dict[str, float]]:
        if self._update is not None:
            return self._update[0], dict(self._update[1])
        sums = all_reduce_sum_(self.statistics(x).to(x.logprob_BT.device)).cpu()
        valid_frac = float(x.mtp_rl_mask_KBT[0].float().mean())
        return self._lambda(occ_ratio(sums, self.cfg.estimator.value, self.cfg.masked, self.cfg.eps),
                            x.coef_scale, valid_frac)

    def _lambda(self, estimate: tuple[float, float, float], coef_scale: float, valid_frac: float
                ) -> tuple[float, dict[str, float]]:
        c = self.cfg
        ratio, c_hat, v2_hat = estimate
        lam, self.ema_lambda = shape_lambda(c.lambda_plus * coef_scale * ratio, clamp=c.clamp, ema=c.ema,
                                            prev=self.ema_lambda)
        return lam, {"occ/lambda": lam, "occ/ratio": ratio, "occ/c_hat": c_hat, "occ/v2_hat": v2_hat,
                     "occ/valid_frac": valid_frac}

    def mtp_term(self, x: MtpTermInputs) -> MtpTerm:
        lam, metrics = self.coefficient(x)
        sign = -1.0 if self.cfg.lambda_on is LambdaOn.advantages and lam < 0 else 1.0
        loss, m = mtp_policy_loss(x, adv_scale=sign)
        loss = sign * loss
        with torch.no_grad():
            metrics.update(mtp_ce(x)[1])
        return MtpTerm(loss, lam, {**metrics, **m, "mtp/lambda": lam})

    def state_dict(self) -> dict:
        return {"ema_lambda": self.ema_lambda}

    def load_state_dict(self, state: dict) -> None:
        self.ema_lambda = state.get("ema_lambda")


register(OccConfig())
register(OccConfig(name="occ_own", estimator=Estimator.own_displacement))  # a name for sweeps (e04)
register(OccConfig(name="occ_compat", lambda_plus=0.1, estimator=Estimator.mean_of_ratios, masked=False,
                   lambda_per=LambdaPer.micro_batch, lambda_on=LambdaOn.advantages))
