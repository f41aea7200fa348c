"""Optimal Coefficient Calibration: the log-prob proxy for λ* ∝ ⟨g_RL, g_MTP⟩ / ‖g_MTP‖².

Over valid response tokens, with δ_RL = logp − logp_old and δ_MTP = logp_mtp − logp_old (both heads
scored against the *main* head's old log-prob):
    ĉ = Σ δ_RL·δ_MTP,   v̂² = Σ δ_MTP²,   ratio_of_sums = ĉ / (v̂² + ε)              (the paper)
    mean_of_ratios = mean_t δ_RL·δ_MTP / (δ_MTP² + ε)                         (the released code)
    own_displacement: ratio_of_sums with δ_MTP = logp_mtp − logp_old_mtp        (not in the paper)
The paper's δ_MTP is dominated by the standing gap between the MTP head and the main head (it does not
shrink as the update moves the weights), so v̂² mostly measures that gap, not the MTP term's movement.
`own_displacement` scores the MTP head against its *own* log-probs at the rollout weights (from the same
no-grad pass that gives logp_old, `mtp_occ.update.old_logprobs(with_mtp=True)`), so δ_MTP is the head's
displacement since the rollout, like δ_RL is the main head's.
`masked=False` averages `mean_of_ratios` over the *response slice* (B·R positions, padding included),
as the released code does: its tensors are the response columns only, R wide. Ours are prediction-aligned
prompt + response, so the slice is taken from a response mask (`slice_mask_BT`): the columns from the
first one where any row holds a response position to the last prediction column, R = T − 1 − that.
That shrinks λ by the valid-token fraction of the slice. The released code's rollouts pad responses to
the configured maximum length, ours end at the batch's longest response: the slices (and so λ) agree when
some response reaches the maximum length. Under `ratio_of_sums` the mask only decides which tokens
enter the sums. Computed under no_grad; λ is a constant in the loss.

With one optimizer update per RL step logp == logp_old, so δ_RL = 0 and λ = 0 at that update.

The estimate splits into `occ_sums` (additive sums over any set of tokens: micro-batches, ranks) and
`occ_ratio` (λ's ratio from summed sums), so one λ per optimizer update can be formed from a mini-batch
processed in several micro-batches. Data parallel: `occ_coefficient` all-reduces the sums (pass
`process_group`, or rely on the default group when torch.distributed is initialised) so every rank
uses one λ.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

ESTIMATORS = ("ratio_of_sums", "mean_of_ratios", "own_displacement")
# the entries of `occ_sums`
C_HAT, V2_HAT, RATIO_SUM, VALID, SLICE, POSITIONS = range(6)


def all_reduce_sum_(t: torch.Tensor, process_group=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


def response_slice_positions(slice_mask_BT: torch.Tensor) -> float:
    """B·R, the positions of the response slice of a prediction-aligned batch: R = T − 1 − (the first
    column where any row of `slice_mask_BT` is set); 0 when no row has a response position."""
    cols_T = slice_mask_BT.bool().any(dim=0).nonzero()
    if len(cols_T) == 0:
        return 0.0
    return float(slice_mask_BT.shape[0] * (slice_mask_BT.shape[1] - 1 - int(cols_T[0])))


@torch.no_grad()
def occ_sums(logprob_BT: torch.Tensor, mtp_logprob_BT: torch.Tensor, old_logprob_BT: torch.Tensor,
             mask_BT: torch.Tensor, eps: float = 1e-8, slice_mask_BT: torch.Tensor | None = None,
             old_mtp_logprob_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Local float64 sums `[ĉ, v̂², Σ per-token ratios, valid tokens, response-slice positions, positions]`
    over this batch (index with `C_HAT`, `V2_HAT`, ...). Sums over disjoint batches add up.
    `old_mtp_logprob_BT`: δ_MTP's baseline (`own_displacement`); default the main head's old log-prob."""
    m_BT = mask_BT.to(torch.float64)
    d_rl_BT = (logprob_BT.double() - old_logprob_BT.double()) * m_BT
    base_BT = old_logprob_BT if old_mtp_logprob_BT is None else old_mtp_logprob_BT
    d_mtp_BT = (mtp_logprob_BT.double() - base_BT.double()) * m_BT
    per_tok_BT = d_rl_BT * d_mtp_BT / (d_mtp_BT.square() + eps)
    slice_pos = response_slice_positions(mask_BT if slice_mask_BT is None else slice_mask_BT)
    return torch.stack([(d_rl_BT * d_mtp_BT).sum(), d_mtp_BT.square().sum(), per_tok_BT.sum(), m_BT.sum(),
                        torch.tensor(slice_pos, dtype=torch.float64), torch.tensor(float(m_BT.numel()),
                                                                                  dtype=torch.float64)])


def shape_lambda(lam: float, *, clamp: float, ema: float, prev: float | None, nonneg: bool = False
                 ) -> tuple[float, float | None]:
    """(λ, the EMA's new state) from a raw λ: non-finite → 0 (only reachable with inf/nan inputs; the loop
    counts the fault), then λ ≥ 0 if `nonneg`, |λ| ≤ `clamp` (0 = off), and λ ← ema·prev + (1−ema)·λ when
    `ema` > 0 (the first λ starts the average)."""
    if not math.isfinite(lam):
        lam = 0.0
    if nonneg:
        lam = max(lam, 0.0)
    if clamp > 0:
        lam = max(-clamp, min(clamp, lam))
    if ema > 0:
        lam = lam if prev is None else ema * prev + (1 - ema) * lam
        prev = lam
    return lam, prev


def occ_ratio(sums: torch.Tensor, estimator: str = "ratio_of_sums", masked: bool = True, eps: float = 1e-8
              ) -> tuple[float, float, float]:
    """`(ratio, c_hat, v2_hat)` from (summed) `occ_sums`."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    c_hat, v2_hat, ratio_sum = float(sums[C_HAT]), float(sums[V2_HAT]), float(sums[RATIO_SUM])
    if estimator in ("ratio_of_sums", "own_displacement"):  # the two differ in δ_MTP's baseline (`occ_sums`)
        return c_hat / (v2_hat + eps), c_hat, v2_hat
    count = float(sums[VALID] if masked else sums[SLICE])
    return ratio_sum / max(count, 1.0), c_hat, v2_hat


@torch.no_grad()
def occ_coefficient(logprob_BT: torch.Tensor, mtp_logprob_BT: torch.Tensor, old_logprob_BT: torch.Tensor,
                    mask_BT: torch.Tensor, estimator: str = "ratio_of_sums", masked: bool = True,
                    eps: float = 1e-8, process_group=None, reduce: bool = True,
                    slice_mask_BT: torch.Tensor | None = None) -> tuple[float, float, float]:
    """Return `(ratio, c_hat, v2_hat)`; λ_t = λ₊ · schedule · ratio.

    `ratio` is ĉ/(v̂² + ε) for `ratio_of_sums`, and the mean over tokens of δ_RL·δ_MTP/(δ_MTP² + ε) for
    `mean_of_ratios` (over valid tokens if `masked`, over the response slice of `slice_mask_BT`, default
    `mask_BT`, if not). ĉ and v̂² are always the sums over valid tokens (all-reduced across ranks when
    `reduce` and distributed)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    sums = occ_sums(logprob_BT, mtp_logprob_BT, old_logprob_BT, mask_BT, eps, slice_mask_BT)
    if reduce:  # one buffer, one all-reduce
        sums = all_reduce_sum_(sums.to(logprob_BT.device), process_group).cpu()
    return occ_ratio(sums, estimator, masked, eps)
