"""What every benchmark section shares: the repository root, the regimes and timed variants, the hostile
grading item, the minimum repetitions under the time budget, and `median`."""

from __future__ import annotations

import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
REGIMES = ("detach", "ce", "policy", "occ")
VARIANTS = (*((r, r, False) for r in REGIMES), ("diag", "occ", True))  # (label, regime, diagnose)
HOSTILE = "\\boxed{9^{9^{9^{9}}}}"
MIN_REPS = 3  # repetitions every section keeps even when it runs past its share of the time budget


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")
