"""Write an experiment's report from its run dirs: the tables and figures `make tables` produces, the
paired per-problem test of every run against a reference regime (same seed, same held-out problems),
the base model's score, λ statistics and the wall time. Nothing in the report is typed by hand.

    python experiments/report.py runs/e01_regimes experiments/out/e01      # -> experiments/out/e01/report.md
    python experiments/report.py runs/e02_fixed_lambda experiments/out/e02 --reference runs/e01_regimes:occ --against occ

`--readme experiments/README.md` also replaces the README's block marked `<!-- generated: experiments/out/e01/report.md -->`
… `<!-- end generated -->` with the report (tests check that every such block equals its report file).
`--reference ROOT:REGIME[,REGIME]` adds the runs of those regimes from another sweep (only the seeds the
experiment itself has), e.g. e02's OCC rows, which come from e01 (same seeds, same base).

Runs are read through `analysis.runs` (one metrics frame and one evaluation frame of exactly the chosen
runs, from which every table, figure and per-run number here is drawn); the paired and pooled tests
read the per-problem scores of `eval/samples.jsonl` (`mtp_occ.eval.compare`) and bootstrap them with
`mtp_occ.eval.metrics.paired_bootstrap`, the evaluation's own bootstrap.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import pandas as pd

from analysis.figures import write_figures
from analysis.runs import (
    COEF_LABELS,
    coefficient_columns,
    config_key_columns,
    find_run_dirs,
    load_evals,
    load_metrics,
    qualify_shared_names,
    run_info,
)
from analysis.tables import write_tables
from mtp_occ.eval.compare import compare_runs
from mtp_occ.rundir import RunDir

Runs = dict[tuple[str, int], tuple[Path, dict]]  # (row label, seed) -> (run dir, run_info)


def _label(info: dict, varies: bool) -> str:
    """A run's row name: its regime, plus its coefficient (the keys the regime declares: λ, λ₊) and
    schedule when the regime was run in several configurations."""
    if not varies:
        return info["regime"]
    coef = [f"{COEF_LABELS[k]}={info[k]:g}" for k in coefficient_columns(info["regime"])]
    return " ".join([info["regime"], *coef, f"({info['coef_schedule']})"])


def collect(root: Path, reference: list[tuple[Path, set[str]]]) -> Runs:
    """{(row label, seed): (run dir, run_info)} for the experiment's runs and the reference runs; run
    names shared by two sweeps are qualified (`<sweep>/<name>`) so that the frames keep them apart."""
    runs = [(d, run_info(d)) for d in find_run_dirs(root)]
    seeds = {info["seed"] for _, info in runs}
    for ref_root, regimes in reference:
        runs += [(d, info) for d in find_run_dirs(ref_root)
                 if (info := run_info(d))["regime"] in regimes and info["seed"] in seeds]
    unfinished = [d for d, info in runs if info["status"] != "finished"]
    for d in unfinished:
        print(f"leaving out {d}: not finished (run.json status)")
    runs = [(d, info) for d, info in runs if info["status"] == "finished"]
    qualify_shared_names([info for _, info in runs])
    configs = defaultdict(set)
    for _, info in runs:
        configs[info["regime"]].add(tuple(info[k] for k in config_key_columns(info["regime"])))
    out = {}
    for d, info in runs:
        key = (_label(info, len(configs[info["regime"]]) > 1), info["seed"])
        if key in out:
            raise SystemExit(f"two runs for {key}: {out[key][0]} and {d}; pass fewer roots")
        out[key] = (d, info)
    return out


def _frames(runs: Runs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metrics and the final evaluations of exactly the report's runs (`analysis.runs`' frames)."""
    chosen = list(runs.values())
    return load_metrics(chosen), load_evals(chosen)


def _by_step(metrics: pd.DataFrame, run: str, metric: str) -> dict[int, float]:
    """{step: value} of one run's `metric`, in step order (the frame is sorted by run, metric, step)."""
    rows = metrics[(metrics["run"] == run) & (metrics["metric"] == metric)]
    return dict(zip(rows["step"].tolist(), rows["value"].tolist(), strict=True))


def _series(metrics: pd.DataFrame, run: str, metric: str) -> list[float]:
    """One run's `metric` over the steps that logged it, in step order."""
    return list(_by_step(metrics, run, metric).values())


def _final_avg(evals: pd.DataFrame, run: str) -> float | None:
    """The run's final held-out avg@k averaged over benchmarks (eval/summary.json's average.avg), or
    None when it has no final evaluation."""
    rows = evals[(evals["run"] == run) & (evals["benchmark"] == "average") & (evals["stat"] == "avg")]
    return float(rows["value"].iloc[0]) if len(rows) else None


def paired(runs: Runs, against: str) -> list[str]:
    rows = []
    for (label, seed), (d, _) in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ref = runs.get((against, seed))
        if label == against or ref is None:
            continue
        r = compare_runs(d, ref[0])["average"]
        rows.append(f"| {label} | {seed} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
                    f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['p_value']:.3f} |")
    if not rows:
        return []
    return [f"## Paired test against {against} (per seed; B − A with A = the run, B = {against})", "",
            f"| run | seed | run avg | {against} avg | {against} − run | 95% CI | p |",
            "|---|---:|---:|---:|---:|---|---:|", *rows, "", *pooled(runs, against)]


def pooled(runs: Runs, against: str, n_boot: int = 2000) -> list[str]:
    """Per problem, the difference to `against` averaged over the seeds both have; bootstrap over problems.
    Every seed is evaluated on the same held-out problems, so this is the seed-averaged effect with its
    evaluation uncertainty (seed-to-seed training variance is what the per-seed rows show). The test is
    `paired_bootstrap` of those differences against zero, one random stream across the rows."""
    import numpy as np

    from mtp_occ.eval.compare import load_problem_scores
    from mtp_occ.eval.metrics import paired_bootstrap

    rows, rng = [], np.random.default_rng(0)
    for label in sorted({k[0] for k in runs} - {against}):
        seeds = sorted(s for (lab, s) in runs if lab == label and (against, s) in runs)
        if len(seeds) < 2:
            continue
        per_seed = []
        for s in seeds:
            a, b = (load_problem_scores(runs[key][0]) for key in ((label, s), (against, s)))
            per_seed.append({(bench, i): b[bench][i] - a[bench][i] for bench in a if bench in b
                             for i in a[bench] if i in b[bench]})
        keys = sorted(set.intersection(*(set(d) for d in per_seed)))
        d = [np.mean([ps[k] for ps in per_seed]) for k in keys]
        # a Generator as the seed: paired_bootstrap draws from it (numpy's default_rng passes it through)
        test = paired_bootstrap(dict.fromkeys(keys, 0.0), dict(zip(keys, d, strict=True)), n_boot=n_boot,
                                seed=rng)
        diff, lo, hi, p = test["diff"], test["lo"], test["hi"], test["p_value"]
        same_sign = sum(np.mean(list(ps.values())) > 0 for ps in per_seed)
        rows.append(f"| {label} | {len(seeds)} | {len(keys)} | {100 * diff:+.2f} | "
                    f"[{100 * lo:+.2f}, {100 * hi:+.2f}] | {f'{p:.3f}' if p >= 1e-3 else f'< {1e-3:g}'} | "
                    f"{same_sign}/{len(seeds)} |")
    if not rows:
        return []
    return [f"Pooled over seeds ({against} − run, per-problem differences averaged over seeds, bootstrap over "
            f"problems; last column: seeds in which {against} is ahead):", "",
            f"| run | seeds | problems | {against} − run | 95% CI | p | {against} ahead |",
            "|---|---:|---:|---:|---|---:|---:|", *rows, ""]


def per_label_means(runs: Runs, evals: pd.DataFrame) -> list[str]:
    """Held-out avg@k per row label: mean over seeds, and each seed's value."""
    by = defaultdict(dict)
    for (label, seed), (_, info) in runs.items():
        if (avg := _final_avg(evals, info["run"])) is not None:
            by[label][seed] = 100 * avg
    seeds = sorted({s for v in by.values() for s in v})
    lines = ["| run | mean | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---:|" + "---:|" * len(seeds)]
    for label, v in sorted(by.items(), key=lambda kv: -sum(kv[1].values()) / len(kv[1])):
        cells = " | ".join(f"{v[s]:.1f}" if s in v else "–" for s in seeds)
        lines.append(f"| {label} | {sum(v.values()) / len(v):.1f} | {cells} |")
    return lines


def final_reward(runs: Runs, metrics: pd.DataFrame, last: int = 20) -> list[str]:
    """Training reward at the end of RL: per run, the mean of `reward/mean` over the last `last` steps;
    per configuration, mean ± 95% t-interval over seeds."""
    from analysis.tables import mean_ci

    by = defaultdict(dict)
    for (label, seed), (_, info) in runs.items():
        rewards = _series(metrics, info["run"], "reward/mean")[-last:]
        if rewards:
            by[label][seed] = sum(rewards) / len(rewards)
    lines = [f"| run | final reward (mean of the last {last} steps) | seeds |", "|---|---:|---:|"]
    for label, v in sorted(by.items(), key=lambda kv: -sum(kv[1].values()) / len(kv[1])):
        mean, ci = mean_ci(list(v.values()))
        lines.append(f"| {label} | {mean:.3f} ± {ci:.3f} | {len(v)} |")
    return lines


def fig_lambda_sweep(runs: Runs, evals: pd.DataFrame, out: Path) -> Path | None:
    """Held-out avg@k against the fixed λ of the policy runs, one line per schedule (mean over seeds, seeds as
    dots), the reference (the calibrated regime, OCC) as a horizontal band of its seed range: the shape of
    the paper's Table 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtp_occ.regimes import is_calibrated

    pts = defaultdict(lambda: defaultdict(list))
    ref = []
    for _, info in runs.values():
        if (avg := _final_avg(evals, info["run"])) is None:
            continue
        avg *= 100
        if info["regime"] == "policy":
            pts[info["coef_schedule"]][info["lam"]].append(avg)
        elif is_calibrated(info["regime"]):
            ref.append(avg)
    if sum(len(v) for v in pts.values()) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    if ref:
        ax.axhspan(min(ref), max(ref), color="tab:red", alpha=0.15)
        ax.axhline(sum(ref) / len(ref), color="tab:red", label=f"OCC (mean of {len(ref)} seeds, band = range)")
    for schedule, by_lam in sorted(pts.items()):
        lams = sorted(by_lam)
        line = ax.plot(lams, [sum(by_lam[x]) / len(by_lam[x]) for x in lams], marker="o", label=f"policy, {schedule} λ")
        for x in lams:
            ax.scatter([x] * len(by_lam[x]), by_lam[x], color=line[0].get_color(), alpha=0.35, s=12)
    ax.set_xscale("log")
    ax.set_xlabel("fixed λ (cosine: its starting value)")
    ax.set_ylabel("held-out avg@k (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "fig_lambda_sweep.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def diagnostics(runs: Runs, metrics: pd.DataFrame) -> list[str]:
    """Exact c, v² (first vs second half of training) and how the proxy ĉ, v̂² tracks them."""
    import numpy as np

    rows = []
    for (label, seed), (_, info) in sorted(runs.items()):
        diag = {m: _by_step(metrics, info["run"], m)
                for m in ("diag/c", "diag/v2", "diag/c_hat", "diag/v2_hat")}
        steps = list(diag["diag/c"])  # the steps that ran the exact diagnostics
        if len(steps) < 4:
            continue
        c, v2, c_hat, v2_hat = (np.array([diag[m][s] for s in steps]) for m in diag)
        h = len(steps) // 2
        rows.append(f"| {label} | {seed} | {len(steps)} | {c[:h].mean():.3g} → {c[h:].mean():.3g} | "
                    f"{v2[:h].mean():.3g} → {v2[h:].mean():.3g} | {np.corrcoef(c, c_hat)[0, 1]:.2f} | "
                    f"{(np.sign(c) == np.sign(c_hat)).mean():.2f} | {np.corrcoef(v2, v2_hat)[0, 1]:.2f} |")
    if not rows:
        return []
    return ["", "## Exact decomposition vs the OCC proxy", "",
            "| run | seed | diag steps | c (1st half → 2nd half) | v² (1st → 2nd half) | r(c, ĉ) | sign agreement | r(v², v̂²) |",
            "|---|---:|---:|---|---|---:|---:|---:|", *rows]


def generated_block(report_md: str) -> str:
    """The report as it appears inside experiments/README.md: headings demoted two levels."""
    return "\n".join("##" + line if line.startswith("#") else line for line in report_md.splitlines())


def splice(readme: Path, report: Path) -> None:
    """Replace the README block between `<!-- generated: <report> -->` and `<!-- end generated -->`."""
    begin, end = f"<!-- generated: {report.as_posix()} -->", "<!-- end generated -->"
    text = readme.read_text()
    if begin not in text:
        raise SystemExit(f"{readme}: no '{begin}' marker; add it (and '{end}') where the report goes")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{generated_block(report.read_text())}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference", action="append", default=[], metavar="ROOT:REGIMES",
                        help="runs of these regimes (comma-separated) from another sweep, same seeds only")
    parser.add_argument("--against", default="detach", help="the row label paired tests compare with")
    parser.add_argument("--readme", type=Path, help="also splice the report into this file (experiments/README.md)")
    args = parser.parse_args(argv)
    reference = [(Path(r.split(":")[0]), set(r.split(":")[1].split(","))) for r in args.reference]
    runs = collect(args.root, reference)
    metrics, evals = _frames(runs)
    write_tables(metrics, evals, args.out)
    write_figures(metrics, args.out)
    sources = ", ".join([f"`{args.root}`"] + [f"`{r}` ({', '.join(sorted(g))})" for r, g in reference])
    lines = [f"# Report: {args.root.name}", "", f"{len(runs)} runs from {sources}.", "",
             "## Held-out accuracy per run configuration", "", *per_label_means(runs, evals), "",
             "avg@k (%) on the held-out set, one column per seed.", "",
             "## Training reward", "", *final_reward(runs, metrics), "",
             "Same seed = same prompts and sampling noise in every configuration, so these differ only through "
             "the policy.", ""]
    if evals["regime"].eq("policy").any() and len({k[0] for k in runs if k[0].startswith("policy")}) > 1:
        lines += ["## Table 2 (fixed λ vs OCC)", "", (args.out / "table2.md").read_text(), ""]
        if fig_lambda_sweep(runs, evals, args.out) is not None:
            lines += ["Figure: `fig_lambda_sweep.png` (held-out accuracy against λ, OCC as a band).", ""]
    else:
        lines += ["## Table 1 (regimes)", "", (args.out / "table1.md").read_text(), ""]
    base = RunDir(next(iter(runs.values()))[0]).base_eval.summary
    if base.exists():
        b = json.loads(base.read_text())["average"]
        lines += [f"Base model (before RL, shared by every run): avg {100 * b['avg']:.1f}, pass {100 * b['pass']:.1f}, "
                  f"maj {100 * b['maj']:.1f}.", ""]
    lines += paired(runs, args.against)
    lam = defaultdict(list)
    for (label, _), (_, info) in runs.items():
        lam[label] += _series(metrics, info["run"], "mtp/lambda")
    lines += ["## λ per run configuration (mean over steps of the per-step mean over updates)", "",
              "| run | mean λ | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {sum(v) / len(v):.3g} | {min(v):.3g} | {max(v):.3g} |" for k, v in sorted(lam.items()) if v]
    lines += diagnostics(runs, metrics)
    wall = [sum(_series(metrics, info["run"], "time/step_s")) / 60 for _, info in runs.values()]
    lines += ["", "## Cost", "", (args.out / "cost.md").read_text(), "",
              f"RL time per run (sum of step times): {min(wall):.1f}–{max(wall):.1f} min on 2 CPU cores; "
              "figures: `fig_*.png` here."]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(args.out / "report.md")
    if args.readme:
        splice(args.readme, args.out / "report.md")


if __name__ == "__main__":
    main()
