"""Paired comparison of two evaluated runs: per-benchmark avg@k difference with a bootstrap CI.

What it is
    `python -m mtp_occ.eval.compare RUN_A RUN_B` reads each run's saved samples (a run dir holding
    `eval/samples.jsonl`, an eval dir holding `samples.jsonl`, or the file itself), computes every
    problem's avg@k in both runs, matches problems by id and prints, per benchmark, B - A with a paired
    bootstrap 95% CI over problems and a two-sided p-value. `compare_runs(a, b)` returns the same as a dict.

How it departs from comparing two summary.json numbers
    The pairing removes problem difficulty from the noise: two runs that differ by 3 points on AIME24 are
    often within one problem of each other, and unpaired CIs overlap even when the paired one does not.
    Problems present in only one run are left out (counted in `unmatched`); the "average" row is the
    unweighted mean of the benchmark differences, its CI from resampling each benchmark's problems.

How to use
    python -m mtp_occ.eval.compare runs/detach_s0 runs/occ_s0 [--n-boot 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from mtp_occ.eval.metrics import is_correct, paired_bootstrap, stratified_paired_bootstrap
from mtp_occ.rundir import EvalDir, RunDir


def resolve_samples(path: str | os.PathLike) -> Path:
    """The samples.jsonl behind a run dir, an eval dir or a file path."""
    path = Path(path)
    for candidate in (path, RunDir(path).eval.samples, EvalDir(path).samples):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no samples found for {path}: expected {path}/eval/samples.jsonl, "
                            f"{path}/samples.jsonl or a samples.jsonl path")


def load_problem_scores(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """`{benchmark: {problem id: mean correctness over its samples}}` from a samples.jsonl."""
    totals: dict[str, dict[str, list[int]]] = {}
    samples = resolve_samples(path)
    with open(samples, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key = totals.setdefault(r["benchmark"], {}).setdefault(str(r["id"]), [0, 0])
                key[0] += is_correct(float(r["score"]))
                key[1] += 1
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{samples}:{lineno}: not a sample record ({type(e).__name__}: {e}); "
                                 "expected benchmark, id, score") from None
    return {b: {pid: c / n for pid, (c, n) in problems.items()} for b, problems in totals.items()}


def _average_row(a: dict, b: dict, names: list[str], n_boot: int, seed: int) -> dict[str, float]:
    """Mean over benchmarks of the paired difference; each benchmark resampled independently."""
    diffs = [[b[name][i] - a[name][i] for i in a[name] if i in b[name]] for name in names]
    return stratified_paired_bootstrap(diffs, n_boot=n_boot, seed=seed)


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """`{benchmark: {a, b, diff, lo, hi, p_value, n, unmatched}, "average": {...}}`; diff = B - A."""
    a, b = load_problem_scores(run_a), load_problem_scores(run_b)
    names = [name for name in a if name in b and any(i in b[name] for i in a[name])]
    if not names:
        raise ValueError(f"{run_a} and {run_b} share no benchmark problems; nothing to compare")
    out = {}
    for name in names:
        ids = [i for i in a[name] if i in b[name]]
        stats = paired_bootstrap(a[name], b[name], n_boot=n_boot, seed=seed)
        out[name] = {"a": float(np.mean([a[name][i] for i in ids])),
                     "b": float(np.mean([b[name][i] for i in ids])), **stats}
    average = {"a": float(np.mean([out[n]["a"] for n in names])),
               "b": float(np.mean([out[n]["b"] for n in names]))}
    out["average"] = average | _average_row(a, b, names, n_boot, seed)
    return out


def format_table(result: dict[str, dict[str, float]], label_a: str = "A", label_b: str = "B") -> str:
    """A markdown table, numbers in percentage points."""
    lines = [f"| benchmark | n | {label_a} avg@k | {label_b} avg@k | B - A | 95% CI | p |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name, r in result.items():
        n = str(r["n"]) if "n" in r else ""
        lines.append(f"| {name} | {n} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
                     f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['p_value']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mtp_occ.eval.compare",
                                     description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", help="baseline: run dir, eval dir or samples.jsonl")
    parser.add_argument("run_b", help="candidate: run dir, eval dir or samples.jsonl")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = compare_runs(args.run_a, args.run_b, n_boot=args.n_boot, seed=args.seed)
    print(f"A = {args.run_a}\nB = {args.run_b}\n")
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
