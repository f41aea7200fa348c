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


def _label(info: dict, varying: set[str]) -> str:
    """A run's row name: its regime, plus whichever of its configuration keys (`config_key_columns`: the
    coefficient the regime declares, the schedule, `head_ce`) take several values among that regime's runs;
    a zero `head_ce` is left out, so the plain configuration keeps the regime's own name."""
    parts = [info["regime"]]
    parts += [f"{COEF_LABELS[k]}={info[k]:g}" for k in coefficient_columns(info["regime"]) if k in varying]
    if "coef_schedule" in varying:
        parts.append(f"({info['coef_schedule']})")
    if "head_ce" in varying and info["head_ce"]:
        parts.append(f"+head_ce={info['head_ce']:g}")
    return " ".join(parts)


def base_model_line(runs: Runs) -> list[str]:
    """The base model's score: every run starts from the same weights, and each seed evaluates them with its
    own sampling stream (as it does its final policy), so the line is the mean over seeds of one run's base
    evaluation per seed."""
    per_seed: dict[int, dict] = {}
    for (_, seed), (d, _) in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        summary = RunDir(d).base_eval.summary
        if seed not in per_seed and summary.exists():
            per_seed[seed] = json.loads(summary.read_text())["average"]
    if not per_seed:
        return []
    mean = {k: 100 * sum(b[k] for b in per_seed.values()) / len(per_seed) for k in ("avg", "pass", "maj")}
    over = f"mean over {len(per_seed)} seeds" if len(per_seed) > 1 else f"seed {next(iter(per_seed))}"
    return [f"Base model (before RL, the same weights in every run; its evaluation {over}): avg {mean['avg']:.1f}, "
            f"pass {mean['pass']:.1f}, maj {mean['maj']:.1f}.", ""]


def collect(root: Path, reference: list[tuple[Path, set[str]]], seeds: set[int] | None = None) -> Runs:
    """{(row label, seed): (run dir, run_info)} for the experiment's runs (only `seeds`, when given) and the
    reference runs; run names shared by two sweeps are qualified (`<sweep>/<name>`) so that the frames keep
    them apart."""
    runs = [(d, run_info(d)) for d in find_run_dirs(root)]
    runs = [(d, info) for d, info in runs if seeds is None or info["seed"] in seeds]
    seeds = {info["seed"] for _, info in runs}
    for ref_root, regimes in reference:
        runs += [(d, info) for d in find_run_dirs(ref_root)
                 if (info := run_info(d))["regime"] in regimes and info["seed"] in seeds]
    unfinished = [d for d, info in runs if info["status"] != "finished"]
    for d in unfinished:
        print(f"leaving out {d}: not finished (run.json status)")
    runs = [(d, info) for d, info in runs if info["status"] == "finished"]
    qualify_shared_names([info for _, info in runs])
    values = defaultdict(lambda: defaultdict(set))  # regime -> config key -> the values its runs take
    for _, info in runs:
        for k in config_key_columns(info["regime"]):
            values[info["regime"]][k].add(info[k])
    varying = {regime: {k for k, v in by_key.items() if len(v) > 1} for regime, by_key in values.items()}
    out = {}
    for d, info in runs:
        key = (_label(info, varying[info["regime"]]), info["seed"])
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


def paired(runs: Runs, against: str, per_seed: bool = True) -> list[str]:
    """The per-problem paired test of every run against `against` with the same seed (`compare_runs`), one row
    per (configuration, seed) unless `per_seed` is off, then the test pooled over seeds (`pooled`)."""
    rows = []
    for (label, seed), (d, _) in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ref = runs.get((against, seed))
        if label == against or ref is None or not per_seed:
            continue
        r = compare_runs(d, ref[0])["average"]
        rows.append(f"| {label} | {seed} | {100 * r['a']:.1f} | {100 * r['b']:.1f} | {100 * r['diff']:+.1f} | "
                    f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {r['p_value']:.3f} |")
    if not per_seed:
        return [f"## Paired test against {against}", "", *pooled(runs, against)]
    if not rows:
        return []
    return [f"## Paired test against {against} (per seed; B − A with A = the run, B = {against})", "",
            f"| run | seed | run avg | {against} avg | {against} − run | 95% CI | p |",
            "|---|---:|---:|---:|---:|---|---:|", *rows, "", *pooled(runs, against)]


def pooled(runs: Runs, against: str, n_boot: int = 2000) -> list[str]:
    """Every configuration against `against`, pooled over seeds (`_pooled_rows`)."""
    pairs = [(label, against) for label in sorted({k[0] for k in runs} - {against})]
    rows = _pooled_rows(runs, pairs, n_boot)
    if not rows:
        return []
    return [f"Pooled over seeds ({against} − run, per-problem differences averaged over seeds, bootstrap over "
            f"problems; last column: seeds in which {against} is ahead):", "",
            f"| run | seeds | problems | {against} − run | 95% CI | p | {against} ahead |",
            "|---|---:|---:|---:|---|---:|---:|", *rows, ""]


def head_ce_effect(runs: Runs, n_boot: int = 2000) -> list[str]:
    """Each configuration with `head_ce` against the same configuration without it, pooled over seeds."""
    labels = {k[0] for k in runs}
    pairs = [(base, label) for label in sorted(labels) if " +head_ce=" in label
             and (base := label.split(" +head_ce=")[0]) in labels]
    rows = _pooled_rows(runs, pairs, n_boot)
    if not rows:
        return []
    return ["## The MTP head's own CE (`regime.head_ce`): with − without, pooled over seeds", "",
            "| without | seeds | problems | with − without | 95% CI | p | with ahead |",
            "|---|---:|---:|---:|---|---:|---:|", *rows, ""]


def _pooled_rows(runs: Runs, pairs: list[tuple[str, str]], n_boot: int) -> list[str]:
    """One row per (label, against): per problem, against's score minus label's averaged over the seeds both
    have; bootstrap over problems. Every seed is evaluated on the same held-out problems, so this is the
    seed-averaged effect with its evaluation uncertainty (seed-to-seed training variance is what the
    per-seed rows show). The test is `paired_bootstrap` of those differences against zero, one random
    stream across the rows; the last cell counts the seeds in which `against` is ahead."""
    import numpy as np

    from mtp_occ.eval.compare import load_problem_scores
    from mtp_occ.eval.metrics import paired_bootstrap

    rows, rng = [], np.random.default_rng(0)
    for label, against in pairs:
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
    return rows


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
    """Exact c, v² (first vs second half of training) and how the proxy ĉ, v̂² tracks them; where the runs
    logged it, also the cross-mini-batch c (`diag/c_cross` = ⟨g_RL of the previous update, g_MTP⟩, the
    population quantity the one-step gain needs; within one mini-batch c also holds the two gradients'
    sampling covariance) and how ĉ tracks that."""
    import numpy as np

    def r(x: np.ndarray, y: np.ndarray) -> str:
        return f"{np.corrcoef(x, y)[0, 1]:.2f}" if len(x) > 2 and x.std() > 0 and y.std() > 0 else "–"

    rows, cross_rows = [], []
    for (label, seed), (_, info) in sorted(runs.items()):
        diag = {m: _by_step(metrics, info["run"], m)
                for m in ("diag/c", "diag/v2", "diag/c_hat", "diag/v2_hat", "diag/c_cross")}
        steps = [s for s in diag["diag/c"] if s in diag["diag/c_hat"]]  # the steps that ran the exact diagnostics
        if len(steps) < 4:
            continue
        c, v2, c_hat, v2_hat = (np.array([diag[m][s] for s in steps]) for m in list(diag)[:4])
        h = len(steps) // 2
        rows.append(f"| {label} | {seed} | {len(steps)} | {c[:h].mean():.3g} → {c[h:].mean():.3g} | "
                    f"{v2[:h].mean():.3g} → {v2[h:].mean():.3g} | {r(c, c_hat)} | "
                    f"{(np.sign(c) == np.sign(c_hat)).mean():.2f} | {r(v2, v2_hat)} |")
        cross_steps = [s for s in steps if s in diag["diag/c_cross"]]
        if len(cross_steps) >= 4:
            x = np.array([diag["diag/c_cross"][s] for s in cross_steps])
            xc, xh = (np.array([diag[m][s] for s in cross_steps]) for m in ("diag/c", "diag/c_hat"))
            k = len(cross_steps) // 2
            cross_rows.append(f"| {label} | {seed} | {len(cross_steps)} | {x[:k].mean():.3g} → {x[k:].mean():.3g} | "
                              f"{r(x, xc)} | {r(x, xh)} | {(np.sign(x) == np.sign(xh)).mean():.2f} |")
    if not rows:
        return []
    lines = ["", "## Exact decomposition vs the OCC proxy", "",
             "| run | seed | diag steps | c (1st half → 2nd half) | v² (1st → 2nd half) | r(c, ĉ) | sign agreement | r(v², v̂²) |",
             "|---|---:|---:|---|---|---:|---:|---:|", *rows]
    if cross_rows:
        lines += ["", "Population c (`diag/c_cross`: this update's g_MTP against the previous update's g_RL, "
                  "another mini-batch of the same policy):", "",
                  "| run | seed | steps | c_cross (1st half → 2nd half) | r(c_cross, c) | r(c_cross, ĉ) | sign agreement with ĉ |",
                  "|---|---:|---:|---|---:|---:|---:|", *cross_rows]
    return lines


def _windows(steps: list[int], n: int = 3, width: float = 0.1) -> list[tuple[int, int]]:
    """`n` windows of `width`·len(steps) steps: the start, the middle and the end of training."""
    last, w = max(steps), max(1, round(width * len(steps)))
    starts = [1 + round(i * (last - w) / (n - 1)) for i in range(n)]
    return [(a, a + w - 1) for a in starts]


def lambda_trajectories(runs: Runs, metrics: pd.DataFrame) -> list[str]:
    """λ at the start, middle and end of training per configuration whose λ moves (the calibrated regimes):
    the mean over seeds of each window's mean of `mtp/lambda` (a step's value is the mean over its updates),
    and the share of steps with λ < 0."""
    import numpy as np

    from mtp_occ.regimes import is_calibrated

    by = defaultdict(list)
    for (label, _), (_, info) in sorted(runs.items()):
        if is_calibrated(info["regime"]) and (lam := _by_step(metrics, info["run"], "mtp/lambda")):
            by[label].append(lam)
    if not by:
        return []
    windows = _windows(sorted(next(iter(by.values()))[0]))
    head = " | ".join(f"steps {a}–{b}" for a, b in windows)
    lines = ["## λ over training (calibrated configurations; mean over seeds)", "",
             f"| run | {head} | steps with λ < 0 |", "|---|" + "---:|" * (len(windows) + 1)]
    for label, per_seed in by.items():
        cells = [np.mean([np.mean([v for s, v in lam.items() if a <= s <= b]) for lam in per_seed])
                 for a, b in windows]
        negative = np.mean([np.mean([v < 0 for v in lam.values()]) for lam in per_seed])
        lines.append(f"| {label} | " + " | ".join(f"{c:.3g}" for c in cells) + f" | {100 * negative:.0f}% |")
    return [*lines, "", "Figure: `fig_lambda_trajectories.png` (λ per step, mean over seeds, symmetric-log axis).", ""]


def fig_lambda_trajectories(runs: Runs, metrics: pd.DataFrame, out: Path, smooth: int = 5) -> Path | None:
    """λ per step of every calibrated configuration (mean over seeds, a `smooth`-step running mean), on a
    symmetric-log axis so that λ ≈ 1e-5 and λ ≈ 0.05 are both readable; fixed-λ configurations as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mtp_occ.regimes import is_calibrated

    curves, fixed = defaultdict(list), {}
    for (label, _), (_, info) in sorted(runs.items()):
        lam = pd.Series(_by_step(metrics, info["run"], "mtp/lambda"), dtype=float)
        if len(lam) and is_calibrated(info["regime"]):
            curves[label].append(lam)
        elif len(lam) and info["regime"] == "policy":
            fixed.setdefault(round(float(lam.mean()), 12), set()).add(label)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, per_seed in curves.items():
        mean = pd.concat(per_seed, axis=1).mean(axis=1).rolling(smooth, min_periods=1).mean()
        ax.plot(mean.index, mean.to_numpy(), label=label, linewidth=1.2)
    for lam, labels in fixed.items():  # one line per fixed value, however many configurations share it
        ax.axhline(lam, linestyle="--", color="gray", linewidth=0.9)
        ax.annotate(f"{', '.join(sorted(labels))} (fixed)", (0.01, lam), xycoords=("axes fraction", "data"),
                    fontsize=7, color="gray", va="bottom")
    ax.set_yscale("symlog", linthresh=1e-5)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("RL step")
    ax.set_ylabel("λ (mtp/lambda)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "fig_lambda_trajectories.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def mtp_head(runs: Runs, metrics: pd.DataFrame, first: int = 20, last: int = 20) -> list[str]:
    """The drafter before and after RL, per configuration (mean over seeds): the MTP head's token CE on the
    rollouts (`mtp/ce`) and its acceptance proxy (`mtp/accept`: argmax = the sampled token) over the first
    and the last steps, and the acceptance proxy on the held-out samples of the final evaluation
    (eval/summary.json's `extra.mtp_accept`)."""
    import numpy as np

    by = defaultdict(lambda: defaultdict(list))
    for (label, _), (d, info) in sorted(runs.items()):
        for metric in ("mtp/ce", "mtp/accept"):
            series = _series(metrics, info["run"], metric)
            if series:
                by[label][f"{metric} first"].append(np.mean(series[:first]))
                by[label][f"{metric} last"].append(np.mean(series[-last:]))
        summary = RunDir(d).eval.summary
        if summary.exists() and (acc := json.loads(summary.read_text()).get("extra", {}).get("mtp_accept")) is not None:
            by[label]["held-out"].append(acc)
    if not any("mtp/ce first" in v for v in by.values()):
        return []

    def cell(v: dict, key: str, fmt: str) -> str:
        return format(np.mean(v[key]), fmt) if v.get(key) else "–"

    lines = [f"## The MTP head after RL (mean over seeds; training columns: first {first} → last {last} steps)", "",
             "| run | mtp/ce (rollouts) | mtp/accept (rollouts) | mtp/accept (held-out, final) |",
             "|---|---|---|---:|"]
    for label, v in sorted(by.items()):
        lines.append(f"| {label} | {cell(v, 'mtp/ce first', '.4f')} → {cell(v, 'mtp/ce last', '.4f')} | "
                     f"{cell(v, 'mtp/accept first', '.4f')} → {cell(v, 'mtp/accept last', '.4f')} | "
                     f"{cell(v, 'held-out', '.4f')} |")
    return [*lines, ""]


def cost_per_label(runs: Runs, metrics: pd.DataFrame) -> list[str]:
    """Mean `time/step_s` per configuration (mean ± 95% t-interval over seeds) and its ratio to detach's:
    the regime table (`cost.md`) pools configurations of one regime."""
    from analysis.tables import mean_ci

    by = defaultdict(list)
    for (label, _), (_, info) in sorted(runs.items()):
        if times := _series(metrics, info["run"], "time/step_s"):
            by[label].append(sum(times) / len(times))
    ref = sum(by["detach"]) / len(by["detach"]) if by.get("detach") else float("nan")
    lines = ["| run | s/step | ÷ detach |", "|---|---:|---:|"]
    for label, v in sorted(by.items()):
        mean, ci = mean_ci(v)
        lines.append(f"| {label} | {mean:.3f} ± {ci:.3f} | {mean / ref:.2f} |")
    return lines


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
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="only these seeds of the experiment (e.g. the seeds every configuration has finished)")
    parser.add_argument("--pooled-only", action="store_true",
                        help="paired tests pooled over seeds only (no per-seed rows: for many seeds × configurations)")
    parser.add_argument("--readme", type=Path, help="also splice the report into this file (experiments/README.md)")
    args = parser.parse_args(argv)
    reference = [(Path(r.split(":")[0]), set(r.split(":")[1].split(","))) for r in args.reference]
    runs = collect(args.root, reference, set(args.seeds) if args.seeds else None)
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
    policy_configs = {(info["lam"], info["coef_schedule"]) for _, info in runs.values() if info["regime"] == "policy"}
    if len(policy_configs) > 1:
        lines += ["## Table 2 (fixed λ vs OCC)", "", (args.out / "table2.md").read_text(), ""]
        if fig_lambda_sweep(runs, evals, args.out) is not None:
            lines += ["Figure: `fig_lambda_sweep.png` (held-out accuracy against λ, OCC as a band).", ""]
    else:
        lines += ["## Table 1 (regimes)", "", (args.out / "table1.md").read_text(), ""]
    lines += base_model_line(runs)
    lines += paired(runs, args.against, per_seed=not args.pooled_only)
    lines += head_ce_effect(runs)
    lam = defaultdict(list)
    for (label, _), (_, info) in runs.items():
        lam[label] += _series(metrics, info["run"], "mtp/lambda")
    lines += ["## λ per run configuration (mean over steps of the per-step mean over updates)", "",
              "| run | mean λ | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {sum(v) / len(v):.3g} | {min(v):.3g} | {max(v):.3g} |" for k, v in sorted(lam.items()) if v]
    lines += ["", *lambda_trajectories(runs, metrics)] if fig_lambda_trajectories(runs, metrics, args.out) else []
    lines += mtp_head(runs, metrics)
    lines += diagnostics(runs, metrics)
    wall = [sum(_series(metrics, info["run"], "time/step_s")) / 60 for _, info in runs.values()]
    by_label = len({k[0] for k in runs}) > len({info["regime"] for _, info in runs.values()})
    lines += ["", "## Cost", "", *(cost_per_label(runs, metrics) if by_label else [(args.out / "cost.md").read_text()]), "",
              f"RL time per run (sum of step times): {min(wall):.1f}–{max(wall):.1f} min on 2 CPU cores; "
              "figures: `fig_*.png` here."]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(args.out / "report.md")
    if args.readme:
        splice(args.readme, args.out / "report.md")


if __name__ == "__main__":
    main()
