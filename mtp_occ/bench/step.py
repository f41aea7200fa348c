"""Our RL step as the benchmark times it: rollouts + grading (`rollout`), `rl_update` (`update`), the
whole step (`full_step`) and a fresh copy of model, optimizer and regime for every timing (`fresh`)."""

from __future__ import annotations

import copy
from time import perf_counter

import torch

# ------------------------------------------------------------------------------------- our training step


def rollout(cfg, model, tok, prompts, step: int):
    """`train.collect_rollouts` with the HF backend (`mtp_occ.rollout.HFRollout` is this `generate`) and
    without dynamic sampling (off in the tiny preset), timed in two parts:
    prompts [(step-1)·P, step·P) of the (unshuffled, unbounded) arith stream, graded, rewards shaped."""
    from mtp_occ.eval.templates import get_template
    from mtp_occ.rewards import grade
    from mtp_occ.rl.grpo import overlong_penalty
    from mtp_occ.rollout.hf import generate
    from mtp_occ.rollout.sampling import SamplingSettings
    from mtp_occ.train import step_seed

    a, r, n = cfg.algo, cfg.rollout, cfg.algo.group_size  # n samples per prompt
    idx = list(range((step - 1) * a.prompts_per_step, step * a.prompts_per_step))
    items = [prompts[i] for i in idx]
    t0 = perf_counter()
    template = get_template(cfg.data.template)
    batch = generate(model.lm, tok, [template.render(p.problem, tok) for p in items], n,
                     SamplingSettings.for_rollouts(r), seed=step_seed(cfg.seed, step, 0),
                     add_special_tokens=template.add_special_tokens(tok),
                     row_keys=(torch.tensor(idx).unsqueeze(1) * n + torch.arange(n)).reshape(-1))
    t1 = perf_counter()
    verdicts = grade(batch.completions, [p.answer for p in items for _ in range(n)], grader=cfg.reward.grader,
                     timeout_s=cfg.reward.timeout_s, extract=cfg.reward.extract, workers=cfg.reward.workers or None)
    reward_B = torch.tensor([v.score for v in verdicts]) + overlong_penalty(
        batch.response_len_B, r.max_new_tokens, a.overlong_buffer, a.overlong_factor)
    times = {"generate_s": t1 - t0, "grade_s": perf_counter() - t1, "tokens": int(batch.response_len_B.sum()),
             "seq_tokens": int(batch.attention_mask_BT.sum())}
    return batch, reward_B, times


def update(cfg, model, engine, regime, batch, old_BT, adv_B, step: int, diagnose: bool):
    """`rl_update` as `train()` calls it."""
    from mtp_occ.schedules import build_schedule
    from mtp_occ.update import rl_update

    return rl_update(model, engine, regime, batch, old_BT, adv_B, cfg.algo,
                     coef_scale=build_schedule(cfg.coef_schedule)((step - 1) / cfg.steps),
                     temperature=cfg.rollout.temperature, group_size=cfg.algo.group_size, diagnose=diagnose)


def full_step(cfg, model, tok, engine, regime, prompts, step: int, diagnose: bool = False) -> dict:
    """One RL step, the body of `train()`'s loop minus logging/checkpoints; returns its phase times."""
    from mtp_occ.rl.grpo import group_advantages
    from mtp_occ.update import old_logprobs

    t0 = perf_counter()
    batch, reward_B, times = rollout(cfg, model, tok, prompts, step)
    adv_B = group_advantages(reward_B, cfg.algo.group_size, cfg.algo.norm_std, cfg.algo.adv_eps).to(
        batch.input_ids_BT.device)
    t1 = perf_counter()
    old_BT = old_logprobs(model, batch, cfg.algo.micro_batch_size, cfg.rollout.temperature)
    t2 = perf_counter()
    update(cfg, model, engine, regime, batch, old_BT, adv_B, step, diagnose)
    t3 = perf_counter()
    return {**times, "old_logprob_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0}


def fresh(cfg, base):
    """An identical starting point for every timing: a copy of the base model, a new engine (optimizer)
    and regime, as `train()` builds them for one process."""
    from mtp_occ.engine import build_engine
    from mtp_occ.regimes import build_regime

    model = copy.deepcopy(base)
    engine = build_engine(model, cfg.algo, cfg.deepspeed, total_steps=cfg.steps, world=1)
    return model, engine, build_regime(cfg.regime)
