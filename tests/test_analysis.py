"""analysis/: run dirs and wandb offline files load to the same frame; tables and figures show the
fixture's known numbers; the CLI and the notebook run clean; torch is never imported."""

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from fixtures_runs import BASE, SEEDS, STEPS, isolate_wandb, occ_metrics, reset_wandb, reward, write_sweep
from nbclient import NotebookClient

from analysis.figures import fig_lambda, fig_proxy_vs_exact, write_figures
from analysis.runs import CONFIG_COLUMNS, eval_frame, evals_from_metrics, load_run_dirs, load_wandb_offline
from analysis.tables import cost_table, mean_ci, table1, table2, to_latex, to_markdown

REPO = Path(__file__).resolve().parent.parent
T95_1DF = 12.706  # two seeds: the t-interval's half-width is 12.706 x the standard error


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweeps")
    with pytest.MonkeyPatch.context() as mp:
        isolate_wandb(mp, tmp)
        write_sweep(tmp / "runs", wandb_runs=("occ_s0",))
        reset_wandb()
    return tmp / "runs"


@pytest.fixture(scope="module")
def metrics(root):
    return load_run_dirs(root)


@pytest.fixture(scope="module")
def evals(root):
    return eval_frame(root)


def test_analysis_never_imports_torch_or_wandb():
    code = ("import sys, analysis, analysis.runs, analysis.tables, analysis.figures; "
            "print(sorted(m for m in ('torch', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_run_dirs_load_to_one_long_frame(metrics):
    assert list(metrics.columns) == ["run", "step", "metric", "value"] + CONFIG_COLUMNS
    assert metrics["run"].nunique() == 10
    runs = metrics.drop_duplicates("run").set_index("run")
    expected = ["main", "occ", "constant", 1, "tiny", 0.1, 1.0, 0.0, "finished"]
    assert runs.loc["occ_s1", CONFIG_COLUMNS].tolist() == expected
    assert math.isnan(runs.loc["detach_s0", "lambda_plus"])
    assert runs.loc["policy_lam0.3_constant_s0", "sweep"] == "ablation"
    value = metrics.set_index(["run", "metric", "step"]).loc[("detach_s1", "reward/mean", 4), "value"]
    assert value == pytest.approx(reward("detach", 1, 4))
    assert not metrics.duplicated(["run", "step", "metric"]).any()


def test_eval_frame_reads_summaries_with_their_intervals(evals):
    occ = evals[(evals["run"] == "occ_s1") & (evals["benchmark"] == "aime25")].set_index("stat")["value"]
    assert occ["avg"] == pytest.approx(0.617 + 0.01 + 0.01)
    assert (occ["avg_lo"], occ["avg_hi"]) == pytest.approx((0.607, 0.667))
    average = evals[(evals["run"] == "occ_s1") & (evals["benchmark"] == "average")]
    assert average["stat"].tolist() == ["avg", "pass", "maj"]
    assert set(evals["step"]) == {STEPS}


def test_evals_from_metrics_take_the_last_eval_step(metrics, evals):
    logged = evals_from_metrics(metrics).set_index(["run", "benchmark", "stat"])["value"]
    final = evals[evals["stat"].isin(["avg", "pass", "maj"])].set_index(["run", "benchmark", "stat"])["value"]
    pd.testing.assert_series_equal(logged.sort_index(), final.sort_index(), check_names=False)


def test_wandb_offline_files_give_the_same_frame_as_run_dirs(root, metrics):
    from_wandb = load_wandb_offline(root)
    from_dirs = metrics[metrics["run"] == "occ_s0"]
    assert from_wandb["run"].unique().tolist() == ["occ_s0"]
    assert {"diag/c", "eval/average/avg", "occ/lambda"} <= set(from_dirs["metric"])
    pd.testing.assert_frame_equal(from_wandb.reset_index(drop=True), from_dirs.reset_index(drop=True))


def test_load_wandb_api_without_login_says_how_to_log_in(tmp_path, monkeypatch):
    isolate_wandb(monkeypatch, tmp_path)  # in a fresh process: no login cached by an earlier test
    code = f"import analysis.runs as r; r.load_wandb_api('someone', 'p', cache_dir={str(tmp_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode != 0
    assert "RuntimeError: no wandb login: run `wandb login` once, or set WANDB_API_KEY" in done.stderr


# ---------------------------------------------------------------------------------------- tables
def test_mean_ci_is_the_t_interval():
    assert mean_ci([1.0, 3.0]) == pytest.approx((2.0, T95_1DF * 1.0))
    assert mean_ci([2.0, 4.0, 6.0]) == pytest.approx((4.0, 4.303 * 2.0 / math.sqrt(3)))
    assert math.isnan(mean_ci([5.0])[1])


def test_table1_means_intervals_and_order(evals):
    t = table1(evals)
    assert t.index.tolist() == ["Detach", "CE", "Policy", "OCC"]
    assert list(dict.fromkeys(t.columns.get_level_values(0))) == [
        "AIME24", "AIME25", "AMC23", "MATH-500", "Minerva", "OlympiadBench", "Average"]
    # seeds at base -/+ 1 point, benchmark i at +i points: seed mean base + i, standard error 1 point
    assert t.loc["OCC", ("AIME24", "mean")] == pytest.approx(61.7)
    assert t.loc["CE", ("MATH-500", "mean")] == pytest.approx(47.7 + 3)
    assert t.loc["Policy", ("AIME24", "mean")] == pytest.approx(57.4)  # the lam=0.1 runs only
    assert t.loc["OCC", ("Average", "mean")] == pytest.approx(61.7 + 2.5)
    assert t[[(c, "ci") for c in ("AIME24", "Average")]].to_numpy() == pytest.approx(T95_1DF)


def test_table2_rows_per_lambda_and_single_seed_intervals(evals):
    t = table2(evals)
    assert t.index.tolist() == ["Policy λ=0.05 (cosine)", "Policy λ=0.1 (constant)",
                                "Policy λ=0.3 (constant)", "OCC λ₊=1 (constant)"]
    one_seed = t.loc["Policy λ=0.3 (constant)"]
    assert (one_seed[("AIME24", "mean")], one_seed[("AIME24", "ci")]) == pytest.approx((54.0, 3.0))  # eval CI
    assert math.isnan(one_seed[("Average", "ci")])
    assert "| Policy λ=0.3 (constant) | 54.0 ± 3.0 |" in to_markdown(t)
    assert " 56.5 |\n" in to_markdown(t)  # no interval for a single seed's average


def test_markdown_bolds_the_best_regime(evals):
    md = to_markdown(table1(evals))
    occ = next(line for line in md.splitlines() if line.startswith("| OCC |"))
    assert occ.count("**") == 2 * 7 and "**61.7** ± 12.7" in occ
    assert "**" not in md.split("| OCC |")[0]


@pytest.mark.parametrize("make", [table1, table2])
def test_latex_is_balanced_booktabs(evals, make):
    tex = to_latex(make(evals))
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    header, rows = body.split(r"\midrule")
    rows = [r for r in rows.strip().splitlines()]
    assert len(rows) == len(make(evals))
    assert {line.count("&") for line in [header.strip(), *rows]} == {7}
    assert all(line.endswith(r"\\") for line in rows)
    assert tex.count(r"\textbf{") == 7 and r"$\pm$" in tex
    assert re.search(r"\\begin\{tabular\}\{lr{7}\}", tex)


def test_cost_table_separates_diagnostics_steps(metrics):
    t = cost_table(metrics)
    assert t.index.tolist() == ["Detach", "CE", "Policy", "OCC"]
    assert t[("s/step", "mean")].tolist() == pytest.approx([8.0, 8.2, 8.4, 8.1])
    assert t.loc["OCC", ("s/step ÷ Detach", "mean")] == pytest.approx(8.1 / 8.0)
    assert t.loc["OCC", ("diag s/step", "mean")] == pytest.approx(45.0)
    assert t.loc["OCC", ("diag s/step ÷ Detach", "mean")] == pytest.approx(45.0 / 8.0)
    assert t[("diag s/step", "mean")].isna().tolist() == [True, True, True, False]
    assert "| OCC | 8.10 ± 0.00 | 45.00 ± 0.00 | 1.01 | 5.62 |" in to_markdown(t, digits=2, bold=None)


# --------------------------------------------------------------------------------------- figures
def test_fig_lambda_plots_the_seed_mean(metrics):
    fig = fig_lambda(metrics)
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "OCC"]
    expected = [sum(occ_metrics(s, step, False)["occ/lambda"] for s in SEEDS) / len(SEEDS)
                for step in range(1, STEPS + 1)]
    assert list(line.get_ydata()) == pytest.approx(expected)


def test_fig_proxy_vs_exact_reports_r_and_sign_agreement(metrics, capsys):
    fig = fig_proxy_vs_exact(metrics)
    assert fig.axes[0].get_title() == "c: Pearson r = 1.00, sign agreement 100% (n = 4)"
    assert fig_proxy_vs_exact(metrics[~metrics["metric"].str.startswith("diag/")]) is None
    assert "fig_proxy_vs_exact: skipped" in capsys.readouterr().out


def test_write_figures_writes_png_and_pdf(metrics, tmp_path):
    written = write_figures(metrics, tmp_path)
    names = ["fig_reward", "fig_accuracy", "fig_lambda", "fig_decomposition", "fig_proxy_vs_exact"]
    assert sorted(written) == sorted(tmp_path / f"{n}{s}" for n in names for s in (".png", ".pdf"))
    assert all(p.stat().st_size > 1000 for p in written)
    assert (tmp_path / "fig_reward.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------- CLI, notebook
def test_cli_writes_tables_and_figures(root, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "analysis.tables", "--run-root", str(root), "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, text=True)
    expected = {"table1.md", "table1.tex", "table2.md", "table2.tex", "cost.md"}
    expected |= {f"fig_{n}.{s}" for n in ("reward", "accuracy", "lambda", "decomposition", "proxy_vs_exact")
                 for s in ("png", "pdf")}
    assert {p.name for p in out.iterdir()} == expected
    assert f"**{100 * BASE['occ']:.1f}**" in (out / "table1.md").read_text()


def test_cli_reads_wandb_offline_files(root, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "analysis", "--run-root", str(root), "--out", str(out),
                    "--source", "wandb-offline", "--no-figures"], check=True, cwd=REPO, capture_output=True)
    assert "| OCC | **60.7** |" in (out / "table1.md").read_text()  # occ_s0 alone, from its logged eval


def test_notebook_executes_clean(root, tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_OCC_RUN_ROOT", str(root))
    monkeypatch.setenv("MTP_OCC_ANALYSIS_OUT", str(tmp_path / "out"))
    notebook = nbformat.read(REPO / "analysis" / "paper.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 5  # every figure shown
    assert (tmp_path / "out" / "fig_lambda.png").exists()


def test_a_name_shared_by_two_sweeps_is_qualified(root, tmp_path):
    for sweep in ("a", "b"):
        shutil.copytree(root / "main" / "ce_s0", tmp_path / sweep / "ce_s0")
    assert sorted(load_run_dirs(tmp_path)["run"].unique()) == ["a/ce_s0", "b/ce_s0"]
    assert sorted(eval_frame(tmp_path)["run"].unique()) == ["a/ce_s0", "b/ce_s0"]
