"""Regimes: how the MTP head joins the RL update. A regime is three things and nothing else:
the gradient path (which shared parameters the MTP loss reaches), the MTP loss, and the coefficient λ.

    term = regime.mtp_term(inputs);   loss = pg_loss + term.lam * term.loss

The training loop never branches on a regime's name. A new regime is one new file in this package that
defines a `RegimeConfig` subclass (its coefficient fields named in `coef_keys`, a `build()` method) and
calls `register(...)`. Nothing else changes: every module in this package is imported when the package
is (`_discover`), so the config store, `regime=<name>` on the command line, run names, the analysis
tables (`coefficient_keys`, `is_calibrated`) and the contract tests (parametrised over
`REGIME_CONFIGS`) pick it up.

A regime whose statistic must be formed once per optimizer update (OCC's λ over the whole mini-batch)
also defines `wants_update_statistics` (True), `statistics(x)` (additive local sums for one micro-batch)
and `begin_update(sums, coef_scale)`; `mtp_occ.update.rl_update` calls `begin_update` before each update
with the sums over the mini-batch and all ranks (or `None` when the update is one micro-batch, whose own
inputs then give the statistic) and `begin_update(None)` after it. A regime that needs the MTP head's
own log-probs at the rollout weights (`MtpTermInputs.old_mtp_logprob_BT`) defines `wants_old_mtp` (True).
A regime whose λ needs the update's exact gradients (`occ_exact`) defines `exact_gradients` (True) and
returns `lam = 0` from `mtp_term`; `rl_update` then keeps ∇ of its loss apart (`add_mtp_gradient`) and
calls `finish_update()` before clipping, which fixes λ and adds λ·g_MTP to the gradients.

| regime        | MTP loss                         | grad_path            | λ                         |
|---------------|----------------------------------|----------------------|---------------------------|
| detach        | token CE on the rollout tokens   | none                 | lam (trains the head only)|
| detach_compat | token CE                         | lm_head only         | lam (the released code)   |
| ce            | token CE                         | all                  | lam × schedule            |
| policy        | the main head's clipped loss     | all                  | lam × schedule            |
| occ           | the main head's clipped loss     | all                  | λ₊ × schedule × ĉ/(v̂²+ε)  |
| occ_compat    | as occ, L(λ·A), see `occ`        | all                  | λ₊ = 0.1, unmasked mean of ratios per micro-batch |
| occ_own       | as occ                           | all                  | as occ, δ_MTP = logp_mtp − logp_old_mtp |
| occ_exact     | the main head's clipped loss     | all                  | λ₊ × schedule × c/(v²+ε) from exact gradients |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mtp_occ.config import GradPathConfig, RegimeConfig

# name -> config node (a RegimeConfig subclass instance); filled by the regime modules below
REGIME_CONFIGS: dict[str, RegimeConfig] = {}


def register(node: RegimeConfig) -> RegimeConfig:
    """Add a regime under `node.name`; its class must define `build()` and name fields in `coef_keys`."""
    if node.name in REGIME_CONFIGS:
        raise ValueError(f"regime {node.name!r} registered twice")
    if type(node).build is RegimeConfig.build:
        raise TypeError(f"regime {node.name!r}: {type(node).__name__} must define build()")
    missing = [k for k in type(node).coef_keys if not hasattr(node, k)]
    if missing:
        raise TypeError(f"regime {node.name!r}: coef_keys names {missing}, which {type(node).__name__} lacks")
    REGIME_CONFIGS[node.name] = node
    return node


def coefficient_keys(name: str) -> tuple[str, ...]:
    """The `regime.*` keys that set regime `name`'s coefficient (() for a name not registered here)."""
    node = REGIME_CONFIGS.get(name)
    return type(node).coef_keys if node is not None else ()


def is_calibrated(name: str) -> bool:
    """True when regime `name` estimates λ from log-prob deltas (OCC's family)."""
    node = REGIME_CONFIGS.get(name)
    return node is not None and type(node).calibrated


@dataclass
class MtpTermInputs:
    """Everything a regime may use for one (micro-)batch. Shapes: B sequences, T tokens, K depths.

    `policy_loss_fn(logprob_BT, mask_BT, denom=None, adv_scale=1.0)` is the main head's clipped loss with
    old log-probs, advantages (times `adv_scale`), clipping, aggregation and the mini-batch denominator
    already bound; regimes call it with the MTP log-probs so the MTP term is *the same* loss as the main
    head's."""

    logprob_BT: torch.Tensor  # main head, current policy (with grad)
    old_logprob_BT: torch.Tensor  # main head at rollout time
    mtp_logprob_KBT: torch.Tensor  # MTP heads scoring the same target tokens (grad per grad_path)
    mtp_ce_mask_KBT: torch.Tensor  # target is a response token (labels rolled left by k+1)
    mtp_rl_mask_KBT: torch.Tensor  # ... and the MTP inputs lie inside the response
    mtp_tokens_K: list[float]  # CE-mask tokens per depth in the whole mini-batch (CE normaliser)
    mtp_denom_K: list[float]  # the policy loss's normaliser per depth for the mini-batch (`loss_denominator`)
    policy_loss_fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    coef_scale: float  # the coefficient schedule's multiplier at this progress
    old_mtp_logprob_BT: torch.Tensor | None = None  # depth 1 at rollout time (only when a regime asks for it)


@dataclass
class MtpTerm:
    """The regime's contribution: `lam * loss`. Kept apart so diagnostics can take ∇loss (g_MTP)."""

    loss: torch.Tensor  # the unscaled MTP loss (CE or the clipped policy loss)
    lam: float  # λ at this update, schedule included
    metrics: dict[str, float]


class Regime(Protocol):
    grad_path: GradPathConfig

    def mtp_term(self, x: MtpTermInputs) -> MtpTerm: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def mtp_ce(x: MtpTermInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over depths of the masked token cross-entropy of each MTP head on the rollout tokens."""
    ces = []
    for k in range(x.mtp_logprob_KBT.shape[0]):
        m = x.mtp_ce_mask_KBT[k].to(x.mtp_logprob_KBT.dtype)
        ces.append(-(x.mtp_logprob_KBT[k] * m).sum() / max(x.mtp_tokens_K[k], 1.0))
    mean_ce = torch.stack(ces).mean()
    return mean_ce, {"mtp/ce": float(mean_ce.detach())}


def mtp_policy_loss(x: MtpTermInputs, adv_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The main head's clipped policy loss evaluated with each depth's log-prob in place of logp
    (importance ratio exp(logp_mtp − logp_old_main)), averaged over depths; `adv_scale` multiplies the
    advantages (passed on only when it is not 1)."""
    losses, clipfracs = [], []
    kw = {} if adv_scale == 1.0 else {"adv_scale": adv_scale}
    for k in range(x.mtp_logprob_KBT.shape[0]):
        loss, m = x.policy_loss_fn(x.mtp_logprob_KBT[k], x.mtp_rl_mask_KBT[k], denom=x.mtp_denom_K[k], **kw)
        losses.append(loss)
        clipfracs.append(m["clipfrac"])
    loss = torch.stack(losses).mean()
    return loss, {"mtp/clipfrac": sum(clipfracs) / len(clipfracs)}


class Stateless:
    """Mixin for regimes without state to checkpoint."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_regime(cfg: RegimeConfig) -> Regime:
    """Build the regime for a converted config (dispatch happens here, once)."""
    return cfg.build()  # type: ignore[attr-defined]


def _discover() -> None:
    """Import every module of this package, in name order (the order `REGIME_CONFIGS` lists them in), for
    its `register(...)` calls."""
    import importlib
    import pkgutil

    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{mod.name}")


_discover()

__all__ = ["REGIME_CONFIGS", "MtpTerm", "MtpTermInputs", "Regime", "build_regime", "coefficient_keys",
           "is_calibrated", "mtp_ce", "mtp_policy_loss", "register"]
