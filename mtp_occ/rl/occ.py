"""Optimal Coefficient Calibration: the log-prob proxy for λ* ∝ ⟨g_RL, g_MTP⟩ / ‖g_MTP‖².

Over valid response tokens, with δ_RL = logp − logp_old and δ_MTP = logp_mtp − logp_old (both heads
scored against the *main* head's old log-prob):
    ĉ = Σ δ_RL·δ_MTP,   v̂² = Σ δ_MTP²,   ratio_of_sums = ĉ / (v̂² + ε)              (the paper)
    mean_of_ratios = mean_t δ_RL·δ_MTP / (δ_MTP² + ε)                         (the released code)
`masked=False` averages `mean_of_ratios` over every position, padding included, as the released code
does: that shrinks λ by the valid-token fraction. Under `ratio_of_sums` the mask only decides which
tokens enter the sums. Computed under no_grad; λ is a constant in the loss.

With one optimizer update per RL step logp == logp_old, so δ_RL = 0 and λ = 0 at that update.

Data parallel: pass `process_group` (or rely on the default group when torch.distributed is
initialised) and the sums are all-reduced so every rank uses one λ.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ESTIMATORS = ("ratio_of_sums", "mean_of_ratios")


def _all_reduce_sum_(t: torch.Tensor, process_group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


@torch.no_grad()
def occ_coefficient(logprob_BT: torch.Tensor, mtp_logprob_BT: torch.Tensor, old_logprob_BT: torch.Tensor,
                    mask_BT: torch.Tensor, estimator: str = "ratio_of_sums", masked: bool = True,
                    eps: float = 1e-8, process_group=None, reduce: bool = True
                    ) -> tuple[float, float, float]:
    """Return `(ratio, c_hat, v2_hat)`; λ_t = λ₊ · schedule · ratio.

    `ratio` is ĉ/(v̂² + ε) for `ratio_of_sums`, and the mean over tokens of δ_RL·δ_MTP/(δ_MTP² + ε) for
    `mean_of_ratios` (over valid tokens if `masked`, over all positions if not). ĉ and v̂² are always
    the sums over valid tokens (all-reduced across ranks when `reduce` and distributed)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    m_BT = mask_BT.to(torch.float64)
    d_rl_BT = (logprob_BT.double() - old_logprob_BT.double()) * m_BT
    d_mtp_BT = (mtp_logprob_BT.double() - old_logprob_BT.double()) * m_BT
    per_tok_BT = d_rl_BT * d_mtp_BT / (d_mtp_BT.square() + eps)
    denom = m_BT.sum() if masked else torch.tensor(float(m_BT.numel()), dtype=torch.float64)
    # one buffer, one all-reduce: [ĉ, v̂², Σ per-token ratios, count]
    sums = torch.stack([(d_rl_BT * d_mtp_BT).sum(), d_mtp_BT.square().sum(), per_tok_BT.sum(), denom])
    if reduce:
        sums = _all_reduce_sum_(sums.to(logprob_BT.device), process_group).cpu()
    c_hat, v2_hat, ratio_sum, count = (float(x) for x in sums)
    if estimator == "ratio_of_sums":
        ratio = c_hat / (v2_hat + eps)
    else:
        ratio = ratio_sum / max(count, 1.0)
    return ratio, c_hat, v2_hat
