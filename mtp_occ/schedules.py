"""Schedules as pure functions, each family dispatched once by name through its registry.

Coefficient schedules (`SCHEDULES`, `build_schedule`): functions of training progress p ∈ [0, 1]
returning a multiplier on λ (or on λ₊ for OCC).

    constant                1
    linear                  start + (end − start)·p
    cosine                  end + (start − end)·(1 + cos(πp))/2
    warmup_then_constant    min(1, p / warmup_frac)
    step                    gamma ** (number of milestones ≤ p)

Learning-rate schedules (`LR_SCHEDULES`, `build_lr_schedule`; names from `config.LrSchedule`):
functions `(step, warmup_steps, total_steps)` returning a multiplier on the peak LR, for
`torch.optim.lr_scheduler.LambdaLR`. Both warm up linearly, (step + 1) / warmup_steps for
step < warmup_steps; then, with p = (step − warmup_steps) / max(1, total_steps − warmup_steps):

    constant                1                                   (the paper's RL runs)
    cosine                  0.1 + 0.9·(1 + cos(π·min(p, 1)))/2  (RL with lr_schedule=cosine; pre-training)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mtp_occ.config import CoefScheduleConfig, LrSchedule


def constant(p: float, c: CoefScheduleConfig) -> float:
    return 1.0


def linear(p: float, c: CoefScheduleConfig) -> float:
    return c.start + (c.end - c.start) * p


def cosine(p: float, c: CoefScheduleConfig) -> float:
    return c.end + (c.start - c.end) * 0.5 * (1.0 + math.cos(math.pi * p))


def warmup_then_constant(p: float, c: CoefScheduleConfig) -> float:
    return 1.0 if c.warmup_frac == 0 else min(1.0, p / c.warmup_frac)


def step(p: float, c: CoefScheduleConfig) -> float:
    return c.gamma ** sum(1 for m in c.milestones if p >= m)


SCHEDULES: dict[str, Callable[[float, CoefScheduleConfig], float]] = {
    "constant": constant, "linear": linear, "cosine": cosine,
    "warmup_then_constant": warmup_then_constant, "step": step,
}


def build_schedule(cfg: CoefScheduleConfig) -> Callable[[float], float]:
    """`multiplier(progress)` for a converted config; progress is clipped to [0, 1]."""
    fn = SCHEDULES[cfg.name.value]
    return lambda p: fn(min(max(p, 0.0), 1.0), cfg)


def _warmup(step: int, warmup_steps: int) -> float:
    """Linear ramp to 1. LambdaLR evaluates step 0 before the first update, so that update already moves
    at 1 / warmup_steps and update number `warmup_steps` is the first at the peak."""
    return (step + 1) / warmup_steps


def lr_constant(step: int, warmup_steps: int, total_steps: int) -> float:
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


def lr_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Cosine from 1 to 0.1 over the steps after warm-up; p is clamped at 1, so any step past
    `total_steps` stays at 0.1 instead of climbing back up the cosine."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    p = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


LR_SCHEDULES: dict[str, Callable[[int, int, int], float]] = {
    LrSchedule.constant.value: lr_constant, LrSchedule.cosine.value: lr_cosine,
}


def build_lr_schedule(name: LrSchedule | str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """`multiplier(step)` for `LambdaLR`. A closure on purpose: LambdaLR's `state_dict` stores callable
    *objects* (e.g. a `functools.partial`) but not plain functions, so checkpoints hold no schedule and
    a resumed run takes it from its config."""
    fn = LR_SCHEDULES[LrSchedule(name).value]

    def multiplier(step: int) -> float:
        return fn(step, warmup_steps, total_steps)

    return multiplier
