"""The paper's figures from the long metrics frame of `analysis.runs`, one function each, PNG + PDF.

    from analysis.runs import load_run_dirs
    from analysis.figures import fig_reward, write_figures
    metrics = load_run_dirs("runs/")
    fig_reward(metrics, out_dir=Path("analysis/out"))   # -> fig_reward.png, fig_reward.pdf
    write_figures(metrics, Path("analysis/out"))        # all of them

Each `fig_*` returns the matplotlib Figure (None, with a printed note, when the runs hold no data for
it) and saves it when given `out_dir`. Curves are the mean over the runs of a regime (seeds) with a
±1 standard deviation band. Figures are built with `matplotlib.figure.Figure` and drawn by the Agg
canvas, without pyplot: no global state, no GUI backend, nothing to close.

What the paper shows: OCC's λ_t falls over training (Fig. 4) because the alignment c between the RL
and MTP gradients decays while the MTP gradient's norm v² persists ("correlation decays, penalty
persists"); the first-order proxies ĉ, v̂² track the exact inner products at a fraction of the cost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.runs import REGIME_LABELS, REGIME_ORDER, main_config_runs, sort_regimes

COLORS = {r: f"C{i}" for i, r in enumerate(REGIME_ORDER)}
PROXY_REGIMES = ("policy", "occ")  # regimes whose MTP loss is the policy loss that ĉ, v̂² describe


def _color(regime: str) -> str:
    return COLORS.setdefault(regime, f"C{len(COLORS) % 10}")


def _save(fig: Figure, out_dir: Path | None, name: str) -> Figure:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for suffix in (".png", ".pdf"):
            fig.savefig(out_dir / f"{name}{suffix}", dpi=150, bbox_inches="tight")
    return fig


def _skip(name: str, why: str) -> None:  # the note tells a reader why a figure file is missing
    print(f"{name}: skipped, {why}")
    return None


def curves(metrics: pd.DataFrame, metric: str, smooth: int = 1) -> pd.DataFrame:
    """Per regime and step: mean, std and run count of `metric` over runs (each run first smoothed with
    a trailing rolling mean of `smooth` steps)."""
    rows = metrics[metrics["metric"] == metric].sort_values(["run", "step"])
    if smooth > 1:
        smoothed = rows.groupby("run")["value"].transform(lambda v: v.rolling(smooth, min_periods=1).mean())
        rows = rows.assign(value=smoothed)
    out = rows.groupby(["regime", "step"])["value"].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def _plot_band(ax: Axes, curve: pd.DataFrame, regime: str, marker: str | None = None,
               suffix: str = "") -> None:
    color = _color(regime)
    label = REGIME_LABELS.get(regime, regime) + suffix
    ax.plot(curve["step"], curve["mean"], color=color, marker=marker, label=label)
    ax.fill_between(curve["step"], curve["mean"] - curve["std"], curve["mean"] + curve["std"],
                    color=color, alpha=0.2, linewidth=0)


def _regime_curves(metrics: pd.DataFrame, metric: str, name: str, ylabel: str, out_dir: Path | None,
                   smooth: int = 1, marker: str | None = None) -> Figure | None:
    data = curves(metrics, metric, smooth)
    if data.empty:
        return _skip(name, f"no `{metric}` in these runs")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for regime in sort_regimes(data["regime"]):
        _plot_band(ax, data[data["regime"] == regime], regime, marker)
    ax.set(xlabel="RL step", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, name)


# ----------------------------------------------------------------------------------------- figures
def fig_reward(metrics: pd.DataFrame, out_dir: Path | None = None, smooth: int = 1) -> Figure | None:
    """Training reward (`reward/mean`) per regime over RL steps."""
    return _regime_curves(metrics, "reward/mean", "fig_reward", "mean reward", out_dir, smooth)


def fig_accuracy(metrics: pd.DataFrame, out_dir: Path | None = None,
                 metric: str = "eval/average/avg") -> Figure | None:
    """Evaluation accuracy (default: the six-benchmark average avg@k) at each evaluation step."""
    return _regime_curves(metrics, metric, "fig_accuracy", metric.removeprefix("eval/"), out_dir, marker="o")


def fig_lambda(metrics: pd.DataFrame, out_dir: Path | None = None, smooth: int = 1) -> Figure | None:
    """OCC's calibrated coefficient λ_t over training (paper Fig. 4)."""
    fig = _regime_curves(metrics, "occ/lambda", "fig_lambda", "λ_t (occ/lambda)", None, smooth)
    if fig is not None:
        fig.axes[0].axhline(0.0, color="black", linewidth=0.8)
    return fig if fig is None else _save(fig, out_dir, "fig_lambda")


def fig_decomposition(metrics: pd.DataFrame, out_dir: Path | None = None, smooth: int = 1) -> Figure | None:
    """The proxies ĉ (`occ/c_hat`) and v̂² (`occ/v2_hat`) over training; where exact diagnostics exist,
    c (`diag/c`) and v² (`diag/v2`) on a second y-axis (their units differ: gradient inner products,
    not log-prob deltas)."""
    if not (metrics["metric"] == "occ/c_hat").any():
        return _skip("fig_decomposition", "no `occ/c_hat` (no OCC runs)")
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    for ax, (proxy, exact, label) in zip(fig.subplots(1, 2), (("occ/c_hat", "diag/c", "c"),
                                                              ("occ/v2_hat", "diag/v2", "v²")), strict=True):
        data, diag = curves(metrics, proxy, smooth), curves(metrics, exact)
        diag = diag[diag["regime"].isin(data["regime"])]  # overlay the regimes that have the proxy
        for regime in sort_regimes(data["regime"]):
            _plot_band(ax, data[data["regime"] == regime], regime, suffix=" proxy")
        ax.set(xlabel="RL step", ylabel=f"proxy ({proxy})", title=f"{label}: proxy vs exact")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not diag.empty:
            twin = ax.twinx()
            for regime in sort_regimes(diag["regime"]):
                d = diag[diag["regime"] == regime]
                twin.errorbar(d["step"], d["mean"], yerr=d["std"], color=_color(regime), fmt="s--",
                              alpha=0.7, label=f"{REGIME_LABELS.get(regime, regime)} exact")
            twin.set_ylabel(f"exact {label} ({exact})")
            twin.legend(loc="upper right")
        ax.legend(loc="upper left")
    return _save(fig, out_dir, "fig_decomposition")


def proxy_vs_exact(metrics: pd.DataFrame, regimes: tuple[str, ...] = PROXY_REGIMES) -> pd.DataFrame:
    """One row per (regime, run, step) with diagnostics, in `regimes`; columns diag/c_hat, diag/c,
    diag/v2_hat, diag/v2 (NaN where not logged)."""
    keys = ["diag/c_hat", "diag/c", "diag/v2_hat", "diag/v2"]
    rows = metrics[metrics["metric"].isin(keys) & metrics["regime"].isin(regimes)]
    return rows.pivot_table(index=["regime", "run", "step"], columns="metric", values="value")


def fig_proxy_vs_exact(metrics: pd.DataFrame, out_dir: Path | None = None,
                       regimes: tuple[str, ...] = PROXY_REGIMES) -> Figure | None:
    """Scatter of the proxy ĉ against the exact c (and v̂² against v²) at the diagnostics steps of the
    `regimes` whose MTP loss is the policy loss the proxies are built from (Detach's exact c is 0 by
    construction, CE's g_MTP is another loss's), with Pearson r and the fraction of steps where ĉ and c
    agree in sign."""
    points = proxy_vs_exact(metrics, regimes)
    if len(points) < 2 or not {"diag/c_hat", "diag/c"} <= set(points.columns):
        return _skip("fig_proxy_vs_exact", f"fewer than two diagnostics rows in {regimes} runs "
                     "(set diagnostics.every > 0)")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for ax, (proxy, exact, label) in zip(fig.subplots(1, 2), (("diag/c_hat", "diag/c", "c"),
                                                              ("diag/v2_hat", "diag/v2", "v²")), strict=True):
        pts = points[[proxy, exact]].dropna() if {proxy, exact} <= set(points.columns) else points.iloc[:0]
        if len(pts) < 2:
            ax.set_visible(False)
            continue
        x, y = pts[proxy].to_numpy(), pts[exact].to_numpy()
        r = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")
        title = f"{label}: Pearson r = {r:.2f}"
        if label == "c":
            title += f", sign agreement {np.mean(np.sign(x) == np.sign(y)):.0%}"
        for regime in sort_regimes(pts.index.get_level_values("regime")):
            mine = pts.xs(regime, level="regime")
            ax.scatter(mine[proxy], mine[exact], s=16, alpha=0.7, color=_color(regime),
                       label=REGIME_LABELS.get(regime, regime))
        ax.set(xlabel=f"proxy ({proxy})", ylabel=f"exact ({exact})", title=f"{title} (n = {len(x)})")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, out_dir, "fig_proxy_vs_exact")


def write_figures(metrics: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Every figure into `out_dir` (those without data are skipped), for the main configuration of each
    regime (`main_config_runs`, as Table 1); returns the files written."""
    metrics, written = main_config_runs(metrics), []
    for fig_fn in (fig_reward, fig_accuracy, fig_lambda, fig_decomposition, fig_proxy_vs_exact):
        if fig_fn(metrics, out_dir=out_dir) is not None:
            written += [out_dir / f"{fig_fn.__name__}{suffix}" for suffix in (".png", ".pdf")]
    return written
