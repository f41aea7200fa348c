"""Sections 1 + 2: interleaved rounds of update-phase and whole-step timings for every regime and the
exact diagnostics, reported as medians of within-round ratios to detach."""

from __future__ import annotations

from time import perf_counter

from mtp_occ.bench.common import MIN_REPS, VARIANTS, median
from mtp_occ.bench.step import fresh, full_step, rollout, update

# ------------------------------------------------------------------------------------------- 1 + 2 regimes


def round_ratios(times: dict[str, list[float]], ref: str = "detach") -> dict[str, float]:
    """Median over rounds of t[label] / t[ref] within the same round."""
    return {k: median([t / r for t, r in zip(v, times[ref], strict=True)]) for k, v in times.items() if k != ref}


def ratio_spread(times: dict[str, list[float]], ref: str = "detach") -> dict[str, list[float]]:
    """[lower, upper] quartile over rounds of the within-round ratios: the noise behind each median."""
    out = {}
    for k, v in times.items():
        r = sorted(t / x for t, x in zip(v, times[ref], strict=True))
        if k != ref and r:
            out[k] = [r[len(r) // 4], r[(3 * len(r)) // 4]] if len(r) >= 4 else [r[0], r[-1]]
    return out


def rotated(variants: tuple, rnd: int) -> tuple:
    """Round `rnd`'s order: the variants rotated by `rnd`, so none always runs first (load drifts)."""
    k = rnd % len(variants)
    return variants[k:] + variants[:k]


def bench_regimes(cfgs: dict, base, tok, prompts, rounds: int, warmup: int, stop_at: float) -> dict:
    """Interleaved rounds of update-phase and whole-step timings for every variant (see the `mtp_occ.bench`
    docstring); no new round starts after `stop_at` (perf_counter) once `MIN_REPS` rounds are done."""
    from mtp_occ.rl.grpo import group_advantages
    from mtp_occ.update import old_logprobs

    c0 = cfgs["detach"]
    batch, reward_B, _ = rollout(c0, base, tok, prompts, step=1)
    adv_B = group_advantages(reward_B, c0.algo.group_size, c0.algo.norm_std, c0.algo.adv_eps)
    old_BT = old_logprobs(base, batch, c0.algo.micro_batch_size, c0.rollout.temperature)
    upd = {label: [] for label, _, _ in VARIANTS}
    step = {label: [] for label, _, _ in VARIANTS}
    phases = {label: [] for label, _, _ in VARIANTS}
    for rnd in range(-warmup, rounds):
        for label, name, diag in rotated(VARIANTS, rnd):
            model, opt, regime = fresh(cfgs[name], base)
            t = perf_counter()
            update(cfgs[name], model, opt, regime, batch, old_BT, adv_B, 1, diag)
            if rnd >= 0:
                upd[label].append(perf_counter() - t)
        for label, name, diag in rotated(VARIANTS, rnd):
            model, opt, regime = fresh(cfgs[name], base)
            ph = full_step(cfgs[name], model, tok, opt, regime, prompts, 1, diag)
            if rnd >= 0:
                step[label].append(ph["step_s"])
                phases[label].append(ph)
        if rnd >= 0:
            print(f"  regimes round {rnd + 1}/{rounds}: update", " ".join(f"{k}={v[-1]:.3f}" for k, v in upd.items()),
                  "| step", " ".join(f"{k}={v[-1]:.3f}" for k, v in step.items()), flush=True)
        if rnd + 1 >= MIN_REPS and perf_counter() > stop_at:
            print(f"  time budget: stopping after {rnd + 1} rounds", flush=True)
            break
    return {"rounds_done": len(upd["detach"]), "update_s": upd, "step_s": step, "phases": phases, "batch_rows": len(batch),
            "batch_tokens": int(batch.response_len_B.sum()), "update_ratio": round_ratios(upd),
            "step_ratio": round_ratios(step), "update_ratio_quartiles": ratio_spread(upd),
            "step_ratio_quartiles": ratio_spread(step)}
