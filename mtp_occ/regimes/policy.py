"""`policy`: the MTP head gets the main head's clipped policy loss (importance ratio
exp(logp_mtp − logp_old_main), same advantages, clipping and aggregation) with a fixed λ × schedule.
The paper sees it rise, then fall: the correlation c decays while the penalty v² persists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from mtp_occ.config import RegimeConfig
from mtp_occ.regimes import MtpTerm, MtpTermInputs, Stateless, mtp_ce, mtp_policy_loss, register


@dataclass
class PolicyConfig(RegimeConfig):
    coef_keys: ClassVar[tuple[str, ...]] = ("lam",)

    name: str = "policy"
    lam: float = 0.1  # λ: the MTP term's coefficient (times the schedule)

    def build(self) -> PolicyRegime:
        return PolicyRegime(self)


class PolicyRegime(Stateless):
    def __init__(self, cfg: PolicyConfig):
        self.cfg, self.grad_path = cfg, cfg.grad_path

    def mtp_term(self, x: MtpTermInputs) -> MtpTerm:
        loss, metrics = mtp_policy_loss(x)
        with torch.no_grad():
            metrics.update(mtp_ce(x)[1])
        lam = self.cfg.lam * x.coef_scale
        return MtpTerm(loss, lam, {**metrics, "mtp/lambda": lam})


register(PolicyConfig())
