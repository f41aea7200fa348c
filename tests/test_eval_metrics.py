"""avg@k, pass@k, maj@k, the bootstrap CIs and `summarize`, against hand-computed numbers."""

from __future__ import annotations

from fractions import Fraction

import pytest

from mtp_occ.eval.metrics import (
    average_over,
    avg_at_k,
    bootstrap_ci,
    maj_at_k,
    paired_bootstrap,
    pass_at_k,
    per_problem_pass,
    summarize,
)

T, F = True, False


def test_avg_at_k():
    # per problem 1/4, 4/4, 0/4 -> mean 5/12
    assert avg_at_k([[T, F, F, F], [T, T, T, T], [F, F, F, F]]) == pytest.approx(5 / 12)
    assert avg_at_k([[T]]) == 1.0
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        avg_at_k([[T], []])


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 2, Fraction(1, 2)),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, Fraction(9, 10)),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
    (4, 1, 1, Fraction(1, 4)),  # pass@1 = c/n
    (10, 0, 5, Fraction(0)),
    (10, 6, 5, Fraction(1)),  # n - c < k: some correct sample is always drawn
    (100, 3, 10, 1 - Fraction(90 * 89 * 88, 100 * 99 * 98)),  # C(97,10)/C(100,10) = 90*89*88/(100*99*98)
    (1000, 1, 500, Fraction(1, 2)),  # large n: the product form stays exact enough
    (32, 32, 32, Fraction(1)),
])
def test_pass_at_k(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(float(expected), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(n, c, k)


def test_pass_at_k_with_all_samples_is_any_correct():
    assert per_problem_pass([[F, F, T], [F, F, F], [T, T, T]]) == [1.0, 0.0, 1.0]
    # n=4, k=2 per problem: c=1 -> 1/2, c=0 -> 0, c=2 -> 1 - C(2,2)/C(4,2) = 5/6
    assert per_problem_pass([[T, F, F, F], [F] * 4, [T, T, F, F]], k=2) == pytest.approx([0.5, 0.0, 5 / 6])


def test_maj_at_k():
    preds = [["1", "2", "2", None],  # "2" wins 2:1 and is correct -> 1
             ["3", "4", None, None],  # tie: "3" came first, and it is wrong -> 0
             [None, None, None, None],  # no votes -> 0
             ["5", " 5", "6", "6"]]  # "5" == " 5" (whitespace), tie with "6": "5" first, correct -> 1
    correct = [[F, T, T, F], [F, T, F, F], [F, F, F, F], [T, T, F, F]]
    assert maj_at_k(preds, correct) == pytest.approx(0.5)
    # None votes are ignored rather than counted as one answer
    assert maj_at_k([[None, None, "7"]], [[F, F, T]]) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        maj_at_k([["1"]], [[T, F]])


def test_bootstrap_ci_contains_estimate_and_shrinks_with_more_problems():
    small = [0.0, 1.0] * 50  # 100 problems, mean 0.5, sd 0.5 -> normal CI 0.5 +- 0.098
    large = [0.0, 1.0] * 500
    lo_s, hi_s = bootstrap_ci(small, n_boot=2000, seed=1)
    lo_l, hi_l = bootstrap_ci(large, n_boot=2000, seed=1)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert 0.38 < lo_s < 0.42 and 0.58 < hi_s < 0.62
    assert (hi_l - lo_l) < 0.5 * (hi_s - lo_s)  # ~sqrt(10) narrower
    assert bootstrap_ci([0.25]) == (0.25, 0.25)
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)  # seeded
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([])


def test_paired_bootstrap():
    a = {f"p{i}": float(i % 3 == 0) for i in range(60)}
    same = paired_bootstrap(a, dict(a))
    assert (same["diff"], same["lo"], same["hi"], same["p_value"], same["n"]) == (0.0, 0.0, 0.0, 1.0, 60)
    better = paired_bootstrap({k: 0.0 for k in a}, {k: 1.0 for k in a}, n_boot=999)
    assert better["diff"] == 1.0 and better["p_value"] == pytest.approx(1 / 1000)
    # matched by id, not by position; problems in one run only are left out and counted
    r = paired_bootstrap({"x": 0.0, "y": 1.0}, {"y": 0.5, "z": 1.0, "x": 0.5})
    assert r["diff"] == pytest.approx(0.0) and r["n"] == 2 and r["unmatched"] == 1
    assert paired_bootstrap([0.0, 1.0, 1.0], [1.0, 1.0, 1.0])["diff"] == pytest.approx(1 / 3)  # by position
    with pytest.raises(ValueError, match="2 vs 3 values"):
        paired_bootstrap([0.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="share no problem ids"):
        paired_bootstrap({"x": 1.0}, {"y": 1.0})


def _records(bench, scores_by_problem, extracted=None):
    out = []
    for pid, scores in scores_by_problem.items():
        for j, s in enumerate(scores):
            ext = extracted[pid][j] if extracted else str(s)
            out.append({"benchmark": bench, "id": pid, "sample": j, "score": s, "extracted": ext,
                        "timeout": ext is None})
    return out


def test_summarize_and_average():
    records = _records("b1", {"q1": [1.0, 0.0], "q2": [0.0, 0.0], "q3": [1.0, 1.0]},
                       extracted={"q1": ["4", "5"], "q2": ["7", None], "q3": ["1", "1"]})
    records += _records("b2", {"r1": [1.0, 1.0]})
    summary = summarize(records, n_boot=200)
    b1 = summary["b1"]
    assert (b1["n"], b1["k"], b1["timeouts"]) == (3, 2, 1)
    assert b1["avg"] == pytest.approx(0.5)  # (1/2 + 0 + 1) / 3
    assert b1["pass"] == pytest.approx(2 / 3)  # q1, q3
    assert b1["maj"] == pytest.approx(2 / 3)  # q1: tie "4"/"5" -> "4" (correct); q2: "7" wrong; q3: right
    for m in ("avg", "pass", "maj"):
        lo, hi = b1[f"{m}_ci"]
        assert lo <= b1[m] <= hi
    assert summary["b2"] == {"n": 1, "k": 2, "avg": 1.0, "avg_ci": [1.0, 1.0], "pass": 1.0,
                             "pass_ci": [1.0, 1.0], "maj": 1.0, "maj_ci": [1.0, 1.0], "timeouts": 0}
    avg = average_over(summary)
    assert avg == pytest.approx({"avg": 0.75, "pass": 5 / 6, "maj": 5 / 6})  # unweighted over benchmarks


def test_summarize_rejects_uneven_k():
    records = _records("b", {"q1": [1.0, 0.0], "q2": [1.0]})
    with pytest.raises(ValueError, match="problem 'q2' has 1 samples, the first problem has 2"):
        summarize(records)


def test_stratified_paired_bootstrap_resamples_each_benchmark_on_its_own():
    """Against the algorithm written out: one stream, each group's (n_boot, n) resample in turn, the
    bootstrap means averaged over groups."""
    import numpy as np

    from mtp_occ.eval.metrics import stratified_paired_bootstrap

    g = np.random.default_rng(5)
    groups = [g.normal(0.1, 1, 30), g.normal(-0.05, 1, 12), g.normal(0.2, 1, 50)]
    rng = np.random.default_rng(7)
    boots = np.mean([d[rng.integers(0, len(d), size=(400, len(d)))].mean(axis=1) for d in groups], axis=0)
    diff = float(np.mean([d.mean() for d in groups]))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    got = stratified_paired_bootstrap(groups, n_boot=400, seed=7)
    assert got["diff"] == pytest.approx(diff) and (got["lo"], got["hi"]) == pytest.approx((lo, hi))
    assert got["p_value"] == (1 + int(np.sum(np.abs(boots - diff) >= abs(diff) - 1e-12))) / 401
    with pytest.raises(ValueError, match="every group"):
        stratified_paired_bootstrap([[0.1], []])
