"""Grading metrics: disagreement between two graders and the grading-health figures for the logger."""

from __future__ import annotations

from collections.abc import Sequence

from mtp_occ.rewards.graders import Verdict

# ------------------------------------------------------------------------------------------------ metrics


def disagreement(verdicts_a: Sequence[Verdict], verdicts_b: Sequence[Verdict]) -> float:
    """Fraction of items on which two graders' scores differ (0.0 for empty input)."""
    if len(verdicts_a) != len(verdicts_b):
        raise ValueError(f"disagreement(): {len(verdicts_a)} vs {len(verdicts_b)} verdicts; grade the same "
                         "items with both graders")
    if not verdicts_a:
        return 0.0
    return sum(a.score != b.score for a, b in zip(verdicts_a, verdicts_b, strict=True)) / len(verdicts_a)


def reward_metrics(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Grading health for the logger: items graded, timeouts and errors (counts), fraction without an
    extractable answer. No score mean: the trainer logs its own reward/mean (with shaping) and reward/acc."""
    n = len(verdicts)
    return {
        "reward/graded": float(n),
        "reward/timeouts": float(sum(v.timeout for v in verdicts)),
        "reward/errors": float(sum(v.error is not None and not v.timeout for v in verdicts)),
        "reward/no_answer_frac": sum(v.extracted is None for v in verdicts) / n if n else 0.0,
    }
