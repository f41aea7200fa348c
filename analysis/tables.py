"""The paper's tables from a sweep of run dirs, as Markdown and LaTeX (booktabs), plus the figures.

    python -m analysis.tables --run-root runs/ --out analysis/out/      (also: python -m analysis ...)

writes `table1.{md,tex}` (regime x benchmark avg@k), `table2.{md,tex}` (fixed-λ policy runs vs OCC),
`cost.md` (seconds per step) and the figures of `analysis.figures`. In Python each table is one
function returning a DataFrame (rows: labels; columns: (column label, "mean" | "ci"), in percent),
rendered by `to_markdown` / `to_latex`:

    evals = eval_frame("runs/");  print(to_markdown(table1(evals)))

Numbers: mean over seeds ± the half-width of a 95% t-interval over seeds; with a single seed the
evaluation's own bootstrap CI over problems is shown instead (the "Average" column then has none).
Best mean per column in bold. Table 1 wants one configuration per regime: when a regime has runs with
several (its coefficient and schedule, `config_key_columns`), it keeps the one with the most runs
(`main_config_runs`: the main sweep; the rest is Table 2's business) and prints which runs it left out.
The paper (Table 1, avg@32, MiMo-7B-RL): OCC 61.7 > Detach 58.9 > Policy 57.4 > CE 47.7 on the
six-benchmark average.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from analysis.figures import write_figures
from analysis.runs import (
    BENCHMARK_LABELS,
    REGIME_LABELS,
    eval_frame,
    evals_from_metrics,
    load_run_dirs,
    load_wandb_offline,
    main_config_runs,
    sort_benchmarks,
    sort_regimes,
)
from mtp_occ.rundir import METRICS_FILE

# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (no scipy needed); 1.96 beyond
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is NaN for fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, (T95[n - 2] if n - 1 <= len(T95) else 1.96) * sd / math.sqrt(n)


# ----------------------------------------------------------------------------------------- tables
def table1(evals: pd.DataFrame, stat: str = "avg") -> pd.DataFrame:
    """Regime x benchmark `stat`@k (%) and the six-benchmark average, mean ± CI over seeds."""
    evals = main_config_runs(evals)
    evals = evals.assign(row=evals["regime"].map(lambda r: REGIME_LABELS.get(r, r)))
    order = [REGIME_LABELS.get(r, r) for r in sort_regimes(evals["regime"])]
    table = _score_table(evals, order, stat)
    table.index.name = "Regime"
    return table


def table2(evals: pd.DataFrame, stat: str = "avg") -> pd.DataFrame:
    """Fixed-λ policy runs (one row per λ and schedule) against OCC (one row per λ₊ and schedule)."""
    policy = evals[evals["regime"] == "policy"].sort_values(["lam", "coef_schedule"])
    occ = evals[evals["regime"] == "occ"].sort_values(["lambda_plus", "coef_schedule"])
    policy = policy.assign(row=[f"Policy λ={lam:g} ({schedule})" for lam, schedule
                                in zip(policy["lam"], policy["coef_schedule"], strict=True)])
    occ = occ.assign(row=[f"OCC λ₊={lp:g} ({schedule})" for lp, schedule
                          in zip(occ["lambda_plus"], occ["coef_schedule"], strict=True)])
    rows = pd.concat([policy, occ])
    table = _score_table(rows, list(dict.fromkeys(rows["row"])), stat)
    table.index.name = "Run"
    return table


def cost_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean `time/step_s` per regime (steps without diagnostics) and its ratio to Detach; where runs
    logged exact diagnostics (`diag/*`), the cost of those steps and their ratio to a Detach step.
    Paper: OCC 8.07 s, Detach 8.11 s, exact inner products 45.06 s per step."""
    times = metrics[metrics["metric"] == "time/step_s"]
    diag_steps = metrics.loc[metrics["metric"].str.startswith("diag/"), ["run", "step"]].drop_duplicates()
    times = times.merge(diag_steps.assign(diag=True), on=["run", "step"], how="left")
    times["diag"] = times["diag"].astype("boolean").fillna(False).astype(bool)
    per_run = times.groupby(["regime", "diag", "run"])["value"].mean().reset_index()
    out: dict[tuple[str, str], dict[str, float]] = {}
    for name, diag in (("s/step", False), ("diag s/step", True)):
        for regime, runs in per_run[per_run["diag"] == diag].groupby("regime"):
            _put(out, name, regime, *mean_ci(runs["value"].tolist()))
    table = pd.DataFrame(out).reindex(sort_regimes(per_run["regime"]))
    detach = out.get(("s/step", "mean"), {}).get("detach", math.nan)
    for name in [n for n in ("s/step", "diag s/step") if (n, "mean") in table]:
        table[(f"{name} ÷ Detach", "mean")] = table[(name, "mean")] / detach
        table[(f"{name} ÷ Detach", "ci")] = math.nan
    table.index = [REGIME_LABELS.get(r, r) for r in table.index]
    table.index.name = "Regime"
    table.attrs["caption"] = "Wall-clock seconds per RL step (mean ± 95% t-interval over runs)."
    return table


def _put(out: dict[tuple[str, str], dict[str, float]], column: str, row: str, mean: float, ci: float) -> None:
    out.setdefault((column, "mean"), {})[row] = mean
    out.setdefault((column, "ci"), {})[row] = ci


def _score_table(evals: pd.DataFrame, order: list[str], stat: str) -> pd.DataFrame:
    """Rows `order` (values of evals["row"]); columns benchmarks + Average; percent."""
    if evals.empty:
        table = pd.DataFrame(index=pd.Index(order))
        table.attrs["caption"] = "No evaluations found (eval/summary.json or eval/* metrics)."
        return table
    benchmarks = sort_benchmarks(evals["benchmark"]) + ["average"]
    wide = evals.pivot_table(index=["row", "run", "benchmark"], columns="stat", values="value",
                             aggfunc="last")
    out: dict[tuple[str, str], dict[str, float]] = {}
    for (row, benchmark), runs in wide.groupby(level=["row", "benchmark"]):
        if benchmark not in benchmarks or stat not in runs:
            continue
        mean, ci = mean_ci((100 * runs[stat]).tolist())
        if len(runs) == 1 and f"{stat}_hi" in runs:  # one seed: the eval's bootstrap CI over problems
            ci = 100 * float(runs[f"{stat}_hi"].iloc[0] - runs[f"{stat}_lo"].iloc[0]) / 2
        _put(out, BENCHMARK_LABELS.get(benchmark, benchmark), row, mean, ci)
    columns = [(BENCHMARK_LABELS.get(b, b), part) for b in benchmarks for part in ("mean", "ci")]
    table = pd.DataFrame(out).reindex(index=order, columns=pd.MultiIndex.from_tuples(columns))
    k = evals.loc[evals["stat"] == "k", "value"]
    seeds = sorted(set(evals.groupby("row")["run"].nunique()))
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    table.attrs["caption"] = (f"{stat}@{int(k.max()) if len(k) else 'k'} (%), mean ± 95% t-interval over "
                              f"{n} seeds per row (a single seed: the evaluation's bootstrap CI).")
    return table


# -------------------------------------------------------------------------------------- rendering
def to_markdown(table: pd.DataFrame, *, digits: int = 1, bold: str | None = "max") -> str:
    """A GitHub Markdown table: cells "mean ± ci", the best mean per column (`bold`: max | min) in bold."""
    header, rows = _cells(table, digits, bold, pm=" ± ", strong=lambda s: f"**{s}**", missing="–")
    lines = [f"| {' | '.join(header)} |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    caption = table.attrs.get("caption")
    return "\n".join(lines) + (f"\n\n{caption}\n" if caption else "\n")


def to_latex(table: pd.DataFrame, *, digits: int = 1, bold: str | None = "max") -> str:
    """A booktabs `tabular` (needs \\usepackage{booktabs}); the caption goes in a leading comment."""
    header, rows = _cells(table, digits, bold, pm=r" $\pm$ ", strong=lambda s: rf"\textbf{{{s}}}",
                          missing="--", escape=_tex)
    lines = [f"% {_tex(table.attrs['caption'])}"] if table.attrs.get("caption") else []
    lines += [rf"\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", r"\toprule", " & ".join(header) + r" \\",
              r"\midrule", *(" & ".join(row) + r" \\" for row in rows), r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _cells(table: pd.DataFrame, digits: int, bold: str | None, *, pm: str, strong: Callable[[str], str],
           missing: str, escape: Callable[[str], str] = str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells shared by both renderers."""
    labels = list(dict.fromkeys(table.columns.get_level_values(0)))
    header = [escape(table.index.name or "")] + [escape(label) for label in labels]
    rows = [[escape(str(name))] for name in table.index]
    for label in labels:
        means = table[(label, "mean")].round(digits)
        ci = table[(label, "ci")] if (label, "ci") in table else pd.Series(math.nan, index=table.index)
        best = {"max": means.max(), "min": means.min()}.get(bold) if bold else None
        for row, mean, half in zip(rows, means, ci, strict=True):
            if pd.isna(mean):
                row.append(missing)
                continue
            text = f"{mean:.{digits}f}"
            text = strong(text) if best is not None and mean == best else text
            row.append(text if pd.isna(half) else f"{text}{pm}{half:.{digits}f}")
    return header, rows


def _tex(text: str) -> str:
    for plain, tex in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                       ("λ₊", r"$\lambda_+$"), ("λ", r"$\lambda$"), ("±", r"$\pm$"), ("÷", r"$\div$"),
                       ("–", "--")):
        text = text.replace(plain, tex)
    return text


# ------------------------------------------------------------------------------------------- CLI
def write_tables(metrics: pd.DataFrame, evals: pd.DataFrame, out: Path, stat: str = "avg") -> list[Path]:
    """Every table into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in (("table1", table1(evals, stat)), ("table2", table2(evals, stat))):
        for suffix, text in ((".md", to_markdown(table)), (".tex", to_latex(table))):
            (out / f"{name}{suffix}").write_text(text)
            written.append(out / f"{name}{suffix}")
    (out / "cost.md").write_text(to_markdown(cost_table(metrics), digits=2, bold=None))
    return written + [out / "cost.md"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-root", type=Path, default=Path("runs"), help="a sweep, or a dir of sweeps")
    parser.add_argument("--out", type=Path, default=Path("analysis/out"))
    parser.add_argument("--stat", default="avg", choices=["avg", "pass", "maj"], help="Tables 1-2 metric")
    parser.add_argument("--source", default="dirs", choices=["dirs", "wandb-offline"],
                        help="metrics from run dirs (metrics.jsonl) or from wandb offline files")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    from_dirs = args.source == "dirs"
    metrics = load_run_dirs(args.run_root) if from_dirs else load_wandb_offline(args.run_root)
    if metrics.empty:
        looked_for = METRICS_FILE if from_dirs else "run-*.wandb"
        raise SystemExit(f"no runs under {args.run_root} (no {looked_for} files)")
    evals = eval_frame(args.run_root) if from_dirs else metrics.iloc[:0]
    if evals.empty:  # no eval/summary.json, or a wandb source: the last eval/* metrics each run logged
        evals = evals_from_metrics(metrics)
    written = write_tables(metrics, evals, args.out, args.stat)
    written += [] if args.no_figures else write_figures(metrics, args.out)
    print("\n".join(f"wrote {path}" for path in written))


if __name__ == "__main__":
    main()
