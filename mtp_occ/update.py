"""One RL step's optimisation: `updates_per_step` mini-batch updates, each `loss = pg_loss + mtp_term`.

The rollout batch is cut into mini-batches of whole groups (`minibatch_rows`), each mini-batch is one
optimizer update, optionally accumulated over micro-batches whose losses are normalised by the *global
mini-batch* denominators (so accumulation and data parallelism change nothing but memory and speed; see
`mtp_occ.dist`). Micro-batches are fixed row counts or a token budget, optionally packed
(`mtp_occ.microbatch`).

The loop of one update, top to bottom in `rl_update`: global denominators of the mini-batch → its
micro-batches (`micro_batch_rows`; every rank runs the same number, padding with a masked stand-in) →
per micro-batch `_micro_step` (forward, `pg_loss + mtp_term`, backward) → one `engine.step`. Anything
computed once per mini-batch belongs before the micro-batch loop, next to the denominators: a regime with
`wants_update_statistics` (OCC's one λ per update) gets `begin_update(sums)`, where `sums` are its
`statistics` over the whole mini-batch and all ranks from a no-grad forward at the current weights (one
extra forward, only when the update has more than one micro-batch; with one, λ comes from that
micro-batch's own forward and nothing extra runs).

With a token budget, `old_logprobs` runs each mini-batch through exactly the micro-batches the update
will use, so at the first update logp and logp_old come from the same computation on the same tensors.

Gradient clipping treats the shared model and the MTP layers as two groups (`mtp_occ.engine.clip_grads`).
Non-finite gradients skip the update (`fault/skipped_updates`) and the caller stops the run when that
repeats; the message names the term that went non-finite (pg, mtp, or OCC's λ).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from mtp_occ.config import AlgoConfig
from mtp_occ.dist import SUMMED, max_int, sum_floats
from mtp_occ.engine import Engine
from mtp_occ.microbatch import check_packing, cut, forward, micro_batch_rows
from mtp_occ.model.mtp import MTPModel
from mtp_occ.regimes import MtpTermInputs, Regime, mtp_ce
from mtp_occ.rl.diagnostics import Decomposition
from mtp_occ.rl.grpo import loss_denominator, policy_loss
from mtp_occ.rl.occ import occ_coefficient
from mtp_occ.rollout.hf import RolloutBatch


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    skipped: int  # updates skipped for non-finite gradients
    bad_term: str | None  # which term was non-finite in the last skipped update
    # with `diagnose`: each update's metrics and exact decomposition, in order (the step's mean mixes signs)
    per_update: list[dict[str, float]] = dataclasses.field(default_factory=list)


def minibatch_rows(n_groups: int, group_size: int, updates: int, first_group: int = 0) -> list[torch.Tensor]:
    """Row indices of each mini-batch: mini-batch u holds the groups whose *step-global* index
    `first_group + g` is ≡ u (mod updates), g the local group index. Each rank holds a contiguous block of
    the step's groups starting at `first_group` (rank × prompts per rank), so the global mini-batches are
    the single-process ones for any number of ranks, even when a rank holds fewer groups than `updates`
    (its other mini-batches are empty there; `rl_update` runs masked stand-ins for them). Prompts are
    already drawn in random order, so the stride mixes nothing the sampler has not."""
    groups = torch.arange(n_groups)
    return [(groups[(u - first_group) % updates::updates].unsqueeze(1) * group_size
             + torch.arange(group_size)).reshape(-1) for u in range(updates)]


@torch.no_grad()
def old_logprobs(model: MTPModel, batch: RolloutBatch, algo: AlgoConfig | int, temperature: float,
                 first_group: int = 0, with_mtp: bool = False) -> torch.Tensor:
    """log π_old of every sampled token, recomputed by the trainer's own forward (main head only). `algo` as
    an int is a micro-batch row count (the rows of the whole batch in order, no budget, no packing);
    `first_group` as in `minibatch_rows`. `with_mtp`: the same pass also runs the MTP layers and stores
    depth 1's log-probs on `batch.old_mtp_logprob_BT` (OCC's `own_displacement` needs them)."""
    algo = algo if isinstance(algo, AlgoConfig) else AlgoConfig(micro_batch_size=algo)
    check_packing(model, algo)
    was = model.training
    model.eval()
    out_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32, device=batch.input_ids_BT.device)
    mtp_BT = torch.zeros_like(out_BT) if with_mtp else None
    if algo.max_tokens_per_micro_batch:  # the update's own mini-batches and micro-batches
        blocks = minibatch_rows(len(batch) // algo.group_size, algo.group_size, algo.updates_per_step, first_group)
    else:
        blocks = [torch.arange(len(batch))]
    parts = [blk[r] for blk in blocks for r in micro_batch_rows(batch.select(blk), algo)]
    for i in range(max_int(len(parts))):  # the same count on every rank (ZeRO-3 gathers in every forward)
        if i >= len(parts):  # no rows left here: a masked-out stand-in
            forward(model, _null_batch(batch), algo, temperature, with_mtp=with_mtp)
            continue
        part, cols = cut(batch, parts[i], trim=bool(algo.max_tokens_per_micro_batch))
        col_idx = torch.arange(batch.input_ids_BT.shape[1], device=out_BT.device)[cols]
        out = forward(model, part, algo, temperature, with_mtp=with_mtp)
        out_BT[parts[i].to(out_BT.device)[:, None], col_idx] = out.logprob_BT
        if with_mtp:
            mtp_BT[parts[i].to(out_BT.device)[:, None], col_idx] = out.mtp_logprob_KBT[0]
    model.train(was)
    if with_mtp:
        batch.old_mtp_logprob_BT = mtp_BT
    return out_BT


def _term_inputs(out, mb: RolloutBatch, old_BT, adv_B, algo: AlgoConfig, denoms: dict, coef_scale: float
                 ) -> MtpTermInputs:
    def loss_fn(logprob_BT, mask_BT, denom=None, adv_scale=1.0):
        adv = adv_B if adv_scale == 1.0 else adv_B * adv_scale
        return policy_loss(logprob_BT, old_BT, adv, mask_BT, clip_low=algo.clip_low, clip_high=algo.clip_high,
                           dual_clip=algo.dual_clip, agg=algo.agg, level=algo.level.value, denom=denom,
                           token_weight_BT=mb.token_weight_BT)

    return MtpTermInputs(logprob_BT=out.logprob_BT, old_logprob_BT=old_BT, mtp_logprob_KBT=out.mtp_logprob_KBT,
                         mtp_ce_mask_KBT=out.mtp_ce_mask_KBT, mtp_rl_mask_KBT=out.mtp_rl_mask_KBT,
                         mtp_tokens_K=denoms["mtp_tokens"], mtp_denom_K=denoms["mtp"], policy_loss_fn=loss_fn,
                         coef_scale=coef_scale, old_mtp_logprob_BT=mb.old_mtp_logprob_BT)


def _micro_batch(batch: RolloutBatch, mb: RolloutBatch, mb_old, mb_adv, parts: list, i: int, algo: AlgoConfig):
    """Micro-batch `i` of the mini-batch `mb` as `(part, old, adv)`; past this rank's last one, a masked-out
    stand-in that keeps the collectives in step."""
    if i < len(parts):
        part, cols = cut(mb, parts[i], trim=bool(algo.max_tokens_per_micro_batch))
        return part, mb_old[parts[i]][:, cols], mb_adv[parts[i]]
    null = _null_batch(batch)
    return (null, torch.zeros(null.input_ids_BT.shape, dtype=mb_old.dtype, device=mb_old.device),
            torch.zeros(1, dtype=mb_adv.dtype, device=mb_adv.device))


@torch.no_grad()
def _update_statistics(model, regime: Regime, batch: RolloutBatch, mb: RolloutBatch, mb_old, mb_adv, parts: list,
                       n_micro: int, algo: AlgoConfig, denoms: dict, coef_scale: float, temperature: float
                       ) -> torch.Tensor:
    """A regime's once-per-update statistic (`regime.statistics`) summed over the mini-batch's micro-batches
    and all ranks, from a no-grad forward at the current weights (the ones every micro-batch's backward
    will see): one extra forward of the mini-batch."""
    total = None
    for i in range(n_micro):  # the same count on every rank (ZeRO-3 gathers in every forward)
        part, old, adv = _micro_batch(batch, mb, mb_old, mb_adv, parts, i, algo)
        out = forward(model, part, algo, temperature, grad_path=regime.grad_path)
        local = regime.statistics(_term_inputs(out, part, old, adv, algo, denoms, coef_scale)).double().cpu()
        total = local if total is None else total + local
    return torch.tensor(sum_floats(total.tolist()), dtype=torch.float64)


def _head_terms(out, x: MtpTermInputs, head_ce: float) -> tuple[torch.Tensor | float, dict[str, float]]:
    """The drafter's own terms: `head_ce` × token CE of the MTP layers on detached inputs (no gradient to
    shared weights; see `mtp_occ.config.RegimeConfig.head_ce`), and `mtp/accept`, depth 1's argmax hit rate
    on response targets, as this micro-batch's share of the mini-batch (summed like the losses)."""
    hits = float(out.mtp_hit_KBT[0].sum()) if out.mtp_hit_KBT is not None and len(out.mtp_hit_KBT) else 0.0
    metrics = {"mtp/accept": hits / max(x.mtp_tokens_K[0], 1.0)} if x.mtp_tokens_K else {}
    if not head_ce:
        return 0.0, metrics
    ce, _ = mtp_ce(dataclasses.replace(x, mtp_logprob_KBT=out.mtp_head_logprob_KBT))
    aux = head_ce * ce
    return aux, {**metrics, "loss/head_ce": aux.item()}


def _micro_step(model, engine, regime: Regime, mb: RolloutBatch, old_BT, adv_B, algo: AlgoConfig, denoms: dict,
                coef_scale: float, temperature: float, diag: Decomposition | None, last: bool, head_ce: float = 0.0
                ) -> tuple[dict[str, float], str | None]:
    out = forward(model, mb, algo, temperature, grad_path=regime.grad_path, head_ce=head_ce > 0)
    x = _term_inputs(out, mb, old_BT, adv_B, algo, denoms, coef_scale)
    pg, pg_m = x.policy_loss_fn(out.logprob_BT, out.loss_mask_BT, denom=denoms["pg"])
    term = regime.mtp_term(x)
    if getattr(regime, "exact_gradients", False):  # `occ_exact`: ∇mtp_loss kept apart, λ·g_MTP added at the end
        regime.add_mtp_gradient(term.loss)
        mtp_term = term.loss.new_zeros(())
    else:
        mtp_term = term.lam * term.loss
    aux, aux_m = _head_terms(out, x, head_ce)
    metrics = {"loss/pg": pg.item(), "loss/mtp": mtp_term.item(), **{f"pg/{k}": v for k, v in pg_m.items()},
               **term.metrics, **aux_m}
    if diag is not None:
        diag.add(term.loss, term.lam)
        ratio, c_hat, v2_hat = occ_coefficient(out.logprob_BT, out.mtp_logprob_KBT[0], old_BT, out.mtp_rl_mask_KBT[0])
        metrics.update({"diag/c_hat": c_hat, "diag/v2_hat": v2_hat, "diag/ratio_hat": ratio})
    loss = pg + mtp_term + aux  # the one line where the regime meets the policy gradient (aux: the drafter's own)
    engine.backward(loss, last)
    bad = None if math.isfinite(pg.item()) else "pg"
    if bad is None and not math.isfinite(mtp_term.item()):
        bad = "occ λ" if not math.isfinite(term.lam) else "mtp"
    if bad is None and not math.isfinite(aux_m.get("loss/head_ce", 0.0)):
        bad = "head_ce"
    return metrics, bad


def _merge_micro(micro: list[dict[str, float]]) -> dict[str, float]:
    """Losses (`SUMMED`) are already normalised by the mini-batch, so they add up; everything else is averaged."""
    keys = {k for m in micro for k in m}
    return {k: sum(m.get(k, 0.0) for m in micro) if k.startswith(SUMMED)
            else sum(m[k] for m in micro if k in m) / sum(k in m for m in micro) for k in keys}


def _denominators(mb: RolloutBatch, depth: int, agg: str) -> dict:
    """Global mini-batch normalisers (summed over ranks), from the masks the model's forward derives."""
    from mtp_occ.model.mtp import aligned_masks

    loss_BT, ce_KBT, rl_KBT = aligned_masks(mb.attention_mask_BT, mb.response_mask_BT, depth)
    local = [loss_denominator(loss_BT, agg), *(loss_denominator(rl_KBT[k], agg) for k in range(depth)),
             *(float(ce_KBT[k].sum()) for k in range(depth))]
    tot = sum_floats(local)
    return {"pg": tot[0], "mtp": tot[1:1 + depth], "mtp_tokens": tot[1 + depth:]}


def _null_batch(like: RolloutBatch) -> RolloutBatch:
    """One fully masked row: a rank with no rows left still joins the step's collectives."""
    ids = like.input_ids_BT[:1].clone()
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    attn[:, -1] = 1
    return RolloutBatch(ids, attn, resp, like.response_len_B[:1] * 0, like.truncated_B[:1], like.prompt_idx_B[:1],
                        like.completions[:1], 0)


def rl_update(model: MTPModel, engine: Engine, regime: Regime, batch: RolloutBatch, old_BT: torch.Tensor,
              adv_B: torch.Tensor, algo: AlgoConfig, *, coef_scale: float, temperature: float,
              group_size: int, first_group: int = 0, diagnose: bool = False, head_ce: float = 0.0) -> UpdateResult:
    """All mini-batch updates of one RL step through `engine` (`mtp_occ.engine`); returns metrics averaged
    over the updates that had rows on this rank (`first_group` as in `minibatch_rows`). With `diagnose`, also the exact decomposition (`diag/*`), averaged over the updates
    after the first (at the first, logp == logp_old, so the proxy ĉ is 0 by construction)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    skipped, bad_term = 0, None
    model.train()
    check_packing(model, algo)
    shared = [p for p in model.lm.parameters() if p.requires_grad]
    exact = getattr(regime, "exact_gradients", False)
    prev_g_rl, per_update = None, []
    updates = minibatch_rows(len(batch) // group_size, group_size, algo.updates_per_step, first_group)
    for u, rows in enumerate(updates):
        mb, mb_old, mb_adv = batch.select(rows), old_BT[rows], adv_B[rows]
        diag = Decomposition(shared, prev_g_rl) if diagnose else None
        # the step's mean skips the first update's decomposition: there logp == logp_old, so ĉ = 0 by construction
        in_mean = diag is not None and (u > 0 or len(updates) == 1)
        denoms = _denominators(mb, model.depth, algo.agg)
        engine.zero_grad()
        if exact:
            regime.begin_update([p for p in model.parameters() if p.requires_grad], shared)
        parts = micro_batch_rows(mb, algo)
        bad, micro = None, []
        n_micro = max_int(len(parts))  # the same count on every rank
        if getattr(regime, "wants_update_statistics", False):  # one λ for the whole update (see `regimes.occ`)
            regime.begin_update(None if n_micro == 1 else _update_statistics(
                model, regime, batch, mb, mb_old, mb_adv, parts, n_micro, algo, denoms, coef_scale, temperature),
                coef_scale)
        for i in range(n_micro):
            part, old, adv = _micro_batch(batch, mb, mb_old, mb_adv, parts, i, algo)
            m, b = _micro_step(model, engine, regime, part, old, adv, algo, denoms, coef_scale, temperature, diag,
                               last=i == n_micro - 1, head_ce=head_ce)
            bad, micro = bad or b, micro + [m] if i < len(parts) else micro
        if getattr(regime, "wants_update_statistics", False):
            regime.begin_update(None)
        bad = bad if not max_int(bad is not None) else (bad or "remote")  # every rank skips together
        before_clip = regime.finish_update if exact else diag.measure if diag else None
        norm, mtp_norm, applied = engine.step(finite=bad is None, before_clip=before_clip)
        merged = _merge_micro(micro)
        merged.update({"grad/norm": norm, "grad/mtp_norm": mtp_norm, **(diag.result if diag else {}),
                       **(regime.metrics if exact else {})})
        if diag is not None:
            per_update.append(dict(merged))
            prev_g_rl = diag.g_rl
            if not in_mean:
                merged = {k: v for k, v in merged.items() if not k.startswith("diag/")}
        for k, v in merged.items():
            sums[k] += v
            counts[k] += 1
        if not applied:
            skipped, bad_term = skipped + 1, bad or "gradient"
    # a rank's loss shares (`SUMMED`) are averaged over all updates, so that their sum over ranks is the
    # single-process mean even where this rank's share of an update was empty; the rest over its own updates
    metrics = {k: sums[k] / (len(updates) if k.startswith(SUMMED) else counts[k]) for k in sums}
    metrics["fault/skipped_updates"] = float(skipped)
    return UpdateResult(metrics, skipped, bad_term, per_update)
