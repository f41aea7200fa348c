"""`ce`: joint token cross-entropy of the MTP head into the shared weights with a fixed λ × schedule.
The paper finds it hurts: the CE gradient is nearly orthogonal to the RL gradient (c ≈ 0), so only the
perturbation penalty −(Lη²λ²/2)·v² is left."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mtp_occ.config import RegimeConfig
from mtp_occ.regimes import MtpTerm, MtpTermInputs, Stateless, mtp_ce, register


@dataclass
class CeConfig(RegimeConfig):
    coef_keys: ClassVar[tuple[str, ...]] = ("lam",)

    name: str = "ce"
    lam: float = 0.1  # λ: the MTP term's coefficient (times the schedule)

    def build(self) -> CeRegime:
        return CeRegime(self)


class CeRegime(Stateless):
    def __init__(self, cfg: CeConfig):  # also serves `detach` (a CeConfig with another grad path)
        self.cfg, self.grad_path = cfg, cfg.grad_path

    def mtp_term(self, x: MtpTermInputs) -> MtpTerm:
        ce, metrics = mtp_ce(x)
        lam = self.cfg.lam * x.coef_scale
        return MtpTerm(ce, lam, {**metrics, "mtp/lambda": lam})


register(CeConfig())
