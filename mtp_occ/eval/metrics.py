"""Sampling metrics (avg@k, unbiased pass@k, maj@k) and bootstrap confidence intervals over problems.

What it is
    Pure functions on per-sample correctness (no torch; numpy for the bootstrap):
      - avg@k: mean over a problem's k samples, then over problems (the paper reports avg@32).
      - pass@k: Chen et al. (2021)'s unbiased estimator 1 - C(n-c, k) / C(n, k), in the stable product form.
      - maj@k: majority vote over the extracted answers (None votes ignored, ties go to the answer seen
        first); a problem counts as solved if the winning answer was graded correct.
      - `bootstrap_ci`: percentile bootstrap over problems; `paired_bootstrap`: the per-problem difference
        between two runs on the same problems (matched by id), with a two-sided p-value.
      - `summarize(records)`: per-benchmark results from per-sample records, in the `summary.json` layout.

How it departs from common practice
    - Votes are grouped by the extracted string with whitespace removed, not by mathematical equivalence
      ("1/2" and "\\frac{1}{2}" are different votes). This under-counts maj@k slightly for free-form answers
      and is exact for integer answers (AIME, AMC).
    - CIs resample PROBLEMS (the unit that varies between benchmark versions), not samples: with 30 AIME
      problems one problem is 3.3 points however large k is.
    - A sample is correct when its score > 0.5 (graders return 1.0 / 0.0).

How to use
    >>> avg_at_k([[True, False], [True, True]])
    0.75
    >>> round(pass_at_k(n=4, c=1, k=2), 4)
    0.5
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["is_correct", "avg_at_k", "pass_at_k", "maj_at_k", "per_problem_avg", "per_problem_pass",
           "per_problem_maj", "bootstrap_ci", "paired_bootstrap", "summarize", "average_over"]


def is_correct(score: float) -> bool:
    return score > 0.5


def _check_nonempty(correct: Sequence[Sequence[object]], what: str) -> None:
    if not correct:
        raise ValueError(f"{what}: no problems")
    for i, samples in enumerate(correct):
        if not samples:
            raise ValueError(f"{what}: problem {i} has no samples")


# -------------------------------------------------------------------------------------------- per problem


def per_problem_avg(correct: Sequence[Sequence[bool]]) -> list[float]:
    _check_nonempty(correct, "avg@k")
    return [sum(map(bool, samples)) / len(samples) for samples in correct]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def per_problem_pass(correct: Sequence[Sequence[bool]], k: int | None = None) -> list[float]:
    """pass@k per problem; k defaults to each problem's sample count (then it is 1 if any is correct)."""
    _check_nonempty(correct, "pass@k")
    return [pass_at_k(len(s), sum(map(bool, s)), k or len(s)) for s in correct]


def _vote_key(answer: str) -> str:
    return "".join(answer.split())


def per_problem_maj(preds: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> list[float]:
    _check_nonempty(correct, "maj@k")
    if [len(p) for p in preds] != [len(c) for c in correct]:
        raise ValueError("maj@k: preds and correct must have the same shape (problems x samples)")
    out = []
    for answers, oks in zip(preds, correct, strict=True):
        votes: dict[str, list[bool]] = {}  # insertion order = first occurrence, which breaks ties
        for answer, ok in zip(answers, oks, strict=True):
            if answer is not None and answer.strip():
                votes.setdefault(_vote_key(answer), []).append(bool(ok))
        if not votes:
            out.append(0.0)
            continue
        winner = max(votes.values(), key=len)  # max() keeps the first of equal-length lists
        out.append(float(any(winner)))  # same string, same grade, unless one sample timed out
    return out


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    return float(np.mean(per_problem_avg(correct)))


def maj_at_k(preds: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool]]) -> float:
    return float(np.mean(per_problem_maj(preds, correct)))


# ---------------------------------------------------------------------------------------------- bootstrap


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int | np.random.Generator) -> np.ndarray:
    """`n_boot` means of resamples (with replacement) of `values`; a Generator `seed` is drawn from as is
    (so several calls can share one stream)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    block = max(1, 2_000_000 // n)  # bound memory for large held-out sets
    means = [values[rng.integers(0, n, size=(min(block, n_boot - start), n))].mean(axis=1)
             for start in range(0, n_boot, block)]
    return np.concatenate(means)


def bootstrap_ci(per_problem_values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of the mean, resampling problems with replacement."""
    values = np.asarray(per_problem_values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci needs n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    lo, hi = np.quantile(_bootstrap_means(values, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


Values = Mapping[str, float] | Sequence[float]  # per-problem values keyed by id, or in a fixed order


def _as_mapping(values: Values) -> Mapping[str, float]:
    return values if isinstance(values, Mapping) else {str(i): v for i, v in enumerate(values)}


def paired_bootstrap(a_values: Values, b_values: Values, n_boot: int = 1000, alpha: float = 0.05,
                     seed: int | np.random.Generator = 0) -> dict[str, float]:
    """Mean per-problem difference B - A over problems present in both (dicts keyed by problem id, or
    equally long sequences in the same order), with a bootstrap CI and a two-sided p-value for "no
    difference" (null-centred bootstrap). Positive `diff` means B scores higher."""
    keyed = isinstance(a_values, Mapping) or isinstance(b_values, Mapping)
    if not keyed and len(a_values) != len(b_values):
        raise ValueError(f"paired_bootstrap: {len(a_values)} vs {len(b_values)} values; unkeyed runs must "
                         "list the same problems in the same order (or pass dicts keyed by problem id)")
    a, b = _as_mapping(a_values), _as_mapping(b_values)
    ids = [i for i in a if i in b]
    if not ids:
        raise ValueError("paired_bootstrap: the two runs share no problem ids; compare runs on the same "
                         "problems")
    d = np.asarray([b[i] - a[i] for i in ids], dtype=float)
    diff = float(d.mean())
    means = _bootstrap_means(d, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(means - diff) >= abs(diff) - 1e-12))
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_value": (1 + extreme) / (1 + n_boot),
            "n": len(ids), "unmatched": len(set(a) ^ set(b))}


def stratified_paired_bootstrap(diffs_by_group: Sequence[Sequence[float]], n_boot: int = 1000, alpha: float = 0.05,
                                seed: int | np.random.Generator = 0) -> dict[str, float]:
    """The mean over groups (benchmarks) of each group's mean paired difference, with a bootstrap CI and a
    two-sided p-value in which every group is resampled on its own (one random stream, groups in order):
    the benchmark average's uncertainty, each benchmark weighted equally whatever its size."""
    rng = np.random.default_rng(seed)
    groups = [np.asarray(d, dtype=float) for d in diffs_by_group]
    if not groups or any(g.size == 0 for g in groups):
        raise ValueError("stratified_paired_bootstrap: every group needs at least one paired difference")
    diff = float(np.mean([g.mean() for g in groups]))
    means = np.mean([_bootstrap_means(g, n_boot, rng) for g in groups], axis=0)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    extreme = int(np.sum(np.abs(means - diff) >= abs(diff) - 1e-12))
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p_value": (1 + extreme) / (1 + n_boot)}


# ---------------------------------------------------------------------------------------------- summaries


def _group(records: Sequence[Mapping]) -> dict[str, dict[str, list[Mapping]]]:
    grouped: dict[str, dict[str, list[Mapping]]] = {}
    for r in records:
        grouped.setdefault(r["benchmark"], {}).setdefault(str(r["id"]), []).append(r)
    return grouped


def _benchmark_result(name: str, problems: dict[str, list[Mapping]], n_boot: int, alpha: float,
                      seed: int) -> dict:
    samples = [sorted(rows, key=lambda r: r["sample"]) for rows in problems.values()]
    k = len(samples[0])
    uneven = next((pid for pid, rows in zip(problems, samples, strict=True) if len(rows) != k), None)
    if uneven is not None:
        raise ValueError(f"benchmark {name!r}: problem {uneven!r} has {len(problems[uneven])} samples, "
                         f"the first problem has {k}; every problem needs the same k")
    correct = [[is_correct(r["score"]) for r in rows] for rows in samples]
    preds = [[r.get("extracted") for r in rows] for rows in samples]
    out: dict = {"n": len(samples), "k": k}
    for metric, values in (("avg", per_problem_avg(correct)), ("pass", per_problem_pass(correct, k)),
                           ("maj", per_problem_maj(preds, correct))):
        out[metric] = float(np.mean(values))
        out[f"{metric}_ci"] = list(bootstrap_ci(values, n_boot, alpha, seed))
    out["timeouts"] = sum(bool(r.get("timeout")) for rows in samples for r in rows)
    return out


def summarize(records: Sequence[Mapping], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict:
    """`{benchmark: {n, k, avg, avg_ci, pass, pass_ci, maj, maj_ci, timeouts}}` from per-sample records
    (`benchmark, id, sample, score[, extracted, timeout]`), benchmarks in first-seen order."""
    if not records:
        raise ValueError("summarize: no records")
    return {name: _benchmark_result(name, problems, n_boot, alpha, seed)
            for name, problems in _group(records).items()}


def average_over(benchmarks: Mapping[str, Mapping]) -> dict[str, float]:
    """Unweighted mean of avg / pass / maj over benchmarks (each benchmark counts once, as in the paper)."""
    if not benchmarks:
        raise ValueError("average_over: no benchmarks")
    return {m: float(np.mean([b[m] for b in benchmarks.values()])) for m in ("avg", "pass", "maj")}
