"""Coefficient schedules: pure functions of training progress p ∈ [0, 1] returning a multiplier on λ
(or on λ₊ for OCC). Dispatched once by name through `SCHEDULES`.

    constant                1
    linear                  start + (end − start)·p
    cosine                  end + (start − end)·(1 + cos(πp))/2
    warmup_then_constant    min(1, p / warmup_frac)
    step                    gamma ** (number of milestones ≤ p)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from mtp_occ.config import CoefScheduleConfig


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
