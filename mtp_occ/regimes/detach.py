"""`detach`: the MTP head trains on token CE of the rollout tokens; no MTP gradient reaches shared
weights (the baseline). `detach_compat` reproduces the paper's released code, which detached only the
embedding and hidden-state inputs, so its "Detach" still trained the untied LM head with the MTP loss.

λ only scales the MTP head's own learning rate here; the schedule is applied like everywhere else."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtp_occ.config import GradPathConfig
from mtp_occ.regimes import register
from mtp_occ.regimes.ce import CeConfig


@dataclass
class DetachConfig(CeConfig):
    """`ce`'s loss, λ and regime object (`build` is inherited); only the gradient path differs."""

    name: str = "detach"
    grad_path: GradPathConfig = field(
        default_factory=lambda: GradPathConfig(embedding=False, backbone=False, lm_head=False))


register(DetachConfig())
register(DetachConfig(name="detach_compat",
                      grad_path=GradPathConfig(embedding=False, backbone=False, lm_head=True)))
