"""GRPO / DAPO / GSPO math as pure tensor functions (no config objects; callable from any framework).

Shape alphabet (declared once, used in every name): B sequences, G groups, T tokens, K MTP depths.
Log-prob tensors are *prediction-aligned*: index t holds log π(x_{t+1} | x_{≤t}); `mask_BT[t]` is 1
where x_{t+1} is a response token (so the last index is always 0).

Departures from the references, all deliberate:
- Token level: the log-ratio is clamped to ±20 before `exp` (as verl's vanilla loss does) so an MTP head
  whose log-prob is far from the main head's `logp_old` cannot overflow; gradients through a clamped
  entry are zero. Sequence level (GSPO) matches verl's `compute_policy_loss_gspo`: the *raw* token
  log-ratios are averaged over the sequence and only the combined log-ratio is clamped, at 10.
- Dual clip applies to the token-level loss only (as in verl; GSPO's sequence ratio is tightly clipped).
- An all-equal group gets exactly zero advantage (float32 rounding of the group mean would otherwise
  leave ~1e-8, which the std of ~0 plus eps turns into ~0.06).
- `overlong_penalty`'s `factor` is in verl's DAPO units (scores ±1); see its docstring.
- `denom` lets gradient accumulation normalise every micro-batch by the whole mini-batch's count, so
  accumulated micro-batches give exactly the mini-batch loss.

Usage:
    adv_B = group_advantages(rewards_B, group_size=8)
    loss, metrics = policy_loss(logprob_BT, old_logprob_BT, adv_B, mask_BT)
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LEVELS = ("token", "sequence")
_MAX_LOG_RATIO = 20.0  # token level (verl's vanilla loss)
_MAX_SEQ_LOG_RATIO = 10.0  # sequence level (verl's GSPO)


def group_advantages(rewards_B: torch.Tensor, group_size: int, norm_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages. Consecutive blocks of `group_size` rows form a group;
    returns `(r - group mean) / (group std + eps)` with the unbiased std (as verl and TRL), or only
    `r - group mean` when `norm_std=False` (Dr. GRPO). A group whose rewards are all equal gets exactly 0."""
    if rewards_B.ndim != 1 or rewards_B.numel() % group_size != 0:
        raise ValueError(f"rewards_B must be 1-D with a multiple of group_size={group_size} rows, "
                         f"got shape {tuple(rewards_B.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    r_GN = rewards_B.float().view(-1, group_size)
    centred_GN = r_GN - r_GN.mean(dim=1, keepdim=True)
    if norm_std:
        centred_GN = centred_GN / (r_GN.std(dim=1, unbiased=True, keepdim=True) + eps)
    constant_G1 = (r_GN.max(dim=1, keepdim=True).values == r_GN.min(dim=1, keepdim=True).values)
    return centred_GN.masked_fill(constant_G1, 0.0).reshape(-1)


def loss_denominator(mask_BT: torch.Tensor, agg: str) -> float:
    """The normaliser `policy_loss` uses for `agg`: valid tokens (token-mean) or sequences with at
    least one valid token (seq-mean-*). Pass the mini-batch's value as `denom` to every micro-batch."""
    if agg == "token-mean":
        return float(mask_BT.sum())
    if agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float((mask_BT.sum(dim=1) > 0).sum())
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def aggregate(loss_BT: torch.Tensor, mask_BT: torch.Tensor, agg: str, denom: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss: `token-mean` = Σ loss·mask / Σ mask; `seq-mean-token-mean` = mean over
    sequences of each sequence's token mean; `seq-mean-token-sum` = mean over sequences of token sums."""
    mask_BT = mask_BT.to(loss_BT.dtype)
    if denom is None:
        denom = loss_denominator(mask_BT, agg)
    denom = max(denom, 1.0)
    if agg == "token-mean":
        return (loss_BT * mask_BT).sum() / denom
    tokens_B = mask_BT.sum(dim=1)
    seq_sum_B = (loss_BT * mask_BT).sum(dim=1)
    if agg == "seq-mean-token-mean":
        return (seq_sum_B / tokens_B.clamp(min=1.0)).sum() / denom
    if agg == "seq-mean-token-sum":
        return seq_sum_B.sum() / denom
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def _sequence_log_ratio_BT(log_ratio_BT: torch.Tensor, logprob_BT: torch.Tensor,
                           mask_BT: torch.Tensor) -> torch.Tensor:
    """GSPO: s_i = exp(mean_t log r_{i,t}) as the value, with the token-level gradient
    s_i · ∇log π_{i,t} / |y_i| (the stop-gradient construction of the GSPO paper). `log_ratio_BT` is the
    raw (unclamped) token log-ratio, as verl averages it; the caller clamps the result."""
    mask_BT = mask_BT.to(log_ratio_BT.dtype)
    seq_log_ratio_B = (log_ratio_BT * mask_BT).sum(dim=1) / mask_BT.sum(dim=1).clamp(min=1.0)
    return seq_log_ratio_B.detach().unsqueeze(1) + logprob_BT - logprob_BT.detach()


def policy_loss(logprob_BT: torch.Tensor, old_logprob_BT: torch.Tensor, adv_B: torch.Tensor,
                mask_BT: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
                dual_clip: float = 10.0, agg: str = "token-mean", level: str = "token",
                denom: float | None = None, token_weight_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (PPO/DAPO, or GSPO with `level="sequence"`), returned as a loss to minimise.

    Token level: ratio = exp(logprob − old), loss = max(−A·ratio, −A·clip(ratio, 1−clip_low, 1+clip_high)),
    and for A < 0 additionally capped at −A·dual_clip (`dual_clip=0` disables the cap). The per-token loss
    is reduced by `agg` over `mask_BT` (see `aggregate`). Metrics: clipfrac (share of valid tokens where
    the clipped branch is active), dual_clipfrac, ratio_mean, approx_kl (k3 estimator of KL(old||new)).
    `token_weight_BT` multiplies the per-token loss (e.g. truncated importance weights for vLLM rollouts)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level == "sequence":  # verl: mean of the raw token log-ratios, then clamp the sequence one at 10
        log_ratio_BT = _sequence_log_ratio_BT(logprob_BT - old_logprob_BT, logprob_BT, mask_BT
                                              ).clamp(max=_MAX_SEQ_LOG_RATIO)
    else:
        log_ratio_BT = (logprob_BT - old_logprob_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = adv_B.to(ratio_BT.dtype).unsqueeze(1)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_BT = torch.maximum(unclipped_BT, clipped_BT)
    dual_BT = torch.zeros_like(loss_BT, dtype=torch.bool)
    if dual_clip > 0 and level == "token":
        cap_BT = -adv_BT * dual_clip
        dual_BT = (adv_BT < 0) & (loss_BT > cap_BT)
        loss_BT = torch.where(adv_BT < 0, torch.minimum(loss_BT, cap_BT), loss_BT)
    if token_weight_BT is not None:
        loss_BT = loss_BT * token_weight_BT
    loss = aggregate(loss_BT, mask_BT, agg, denom)
    with torch.no_grad():
        m = mask_BT.bool()
        n = max(int(m.sum()), 1)
        neg_log_ratio_BT = -(logprob_BT - old_logprob_BT).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        metrics = {
            "clipfrac": float(((clipped_BT > unclipped_BT) & m).sum()) / n,
            "dual_clipfrac": float((dual_BT & m).sum()) / n,
            "ratio_mean": float(ratio_BT[m].mean()) if m.any() else 1.0,
            "approx_kl": float(((torch.exp(neg_log_ratio_BT) - 1 - neg_log_ratio_BT)[m]).mean()) if m.any() else 0.0,
        }
    return loss, metrics


def overlong_penalty(lengths_B: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0,
                     score_span: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the score: 0 up to `max_len − buffer` tokens, then a
    linear ramp to −factor·score_span/2 at `max_len`, and that beyond.

    `factor` is in verl's DAPO units, where a score is +1 or −1 (correct − wrong = 2) and the penalty
    ramps to −factor. `score_span` is correct − wrong in the scores this penalty is added to: our graders
    score 1/0 (span 1), so the penalty ramps to −factor/2 and the reward is exactly half of verl's
    ±1 + penalty, shifted by a constant. Group-normalised advantages (`norm_std=True`) then equal verl's;
    with `norm_std=False` they are half of verl's, the same factor as for the scores themselves."""
    if buffer <= 0:
        return torch.zeros_like(lengths_B, dtype=torch.float32)
    expected = max_len - buffer
    over_B = (lengths_B.float() - expected).clamp(min=0.0)
    return -(over_B / buffer).clamp(max=1.0) * (factor * score_span / 2.0)


def dynamic_sampling_keep_G(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: a boolean per group, False where every reward in the group is equal
    (zero advantage, so the group carries no gradient)."""
    r_GN = rewards_B.view(-1, group_size)
    return (r_GN.max(dim=1).values - r_GN.min(dim=1).values) > 0
