"""Every experiment file composes; the paper variants pass a dry run (compose + batch arithmetic +
the derived DeepSpeed config for the paper's 128 GPUs)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mtp_occ.config import compose
from mtp_occ.engine import deepspeed_config

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def test_experiment_files_are_linked_into_the_config_tree():
    assert EXPERIMENTS and all((REPO / "conf" / "experiment" / f"{e}.yaml").exists() for e in EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    cfg = compose([f"experiment={name}"])
    assert cfg.run_root.endswith(name)
    if "e02" in name:
        assert cfg.regime.name == "policy" and type(cfg.regime).__name__ == "PolicyConfig"


def test_an_experiments_values_win_over_the_root_configs():
    """conf/config.yaml's own keys (steps, save_every) once came after the experiment and silently replaced
    the preset's (the paper preset checkpointed every 50 steps instead of 10)."""
    paper = compose(["experiment=paper_mimo7b_dapo"])
    assert (paper.steps, paper.save_every, paper.eval_every) == (200, 10, 50)
    rehearsal = compose(["experiment=rehearsal"])
    assert (rehearsal.steps, rehearsal.save_every) == (3, 1)
    assert compose(["experiment=rehearsal", "steps=5"]).steps == 5  # the command line still wins


@pytest.mark.parametrize("name", ["paper_mimo7b_dapo", "paper_e01", "paper_e02"])
def test_paper_presets_dry_run_with_the_batch_arithmetic(name, tmp_path):
    cfg = compose([f"experiment={name}"])
    a = cfg.algo
    assert (a.prompts_per_step, a.group_size, a.updates_per_step) == (128, 16, 4)  # 4 updates of 32 prompts
    assert a.lr == 1e-6 and a.lr_warmup_steps == 10 and a.weight_decay == 0.1 and a.grad_clip == 1.0
    assert (cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens, cfg.steps) == (2048, 8192, 200)
    assert cfg.eval.k == 32 and len(cfg.eval.benchmarks) == 6 and cfg.model.name == "mimo_7b"
    ds = deepspeed_config(cfg.algo, cfg.deepspeed, world=128)
    per_update = 128 * 16 // 4
    assert ds["train_batch_size"] == per_update and ds["zero_optimization"]["stage"] == 3
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", f"experiment={name}", "dry_run=true",
                        f"run_root={tmp_path}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "128"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "128 prompts x 16 = 2048 sequences" in p.stdout and '"train_batch_size": 512' in p.stdout


@pytest.fixture(scope="module")
def fixture_sweeps(tmp_path_factory):
    from fixtures_runs import write_sweep

    root = tmp_path_factory.mktemp("report") / "runs"
    write_sweep(root)  # main: 4 regimes x seeds 0, 1; ablation: two more policy runs, seed 0
    return root


def _report(*args) -> str:
    p = subprocess.run([sys.executable, "experiments/report.py", *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "MPLBACKEND": "Agg"})
    assert p.returncode == 0, p.stderr[-3000:]
    return (Path(args[1]) / "report.md").read_text()


def test_report_of_a_regime_sweep(fixture_sweeps, tmp_path):
    text = _report(fixture_sweeps / "main", tmp_path / "e01")
    assert "8 runs from" in text and "## Table 1 (regimes)" in text
    assert "| ce | 0 |" in text and "| occ | 1 |" in text  # one paired row per (regime, seed)
    assert "| policy | 2 | " in text  # pooled over both seeds
    assert (tmp_path / "e01" / "table1.tex").exists() and (tmp_path / "e01" / "fig_reward.png").exists()


def test_report_of_a_fixed_lambda_sweep_takes_occ_from_a_reference_sweep(fixture_sweeps, tmp_path):
    text = _report(fixture_sweeps / "ablation", tmp_path / "e02", "--reference", f"{fixture_sweeps / 'main'}:occ",
                   "--against", "occ")
    assert "3 runs from" in text and "## Table 2 (fixed λ vs OCC)" in text
    assert "| policy λ=0.3 (constant) | 0 |" in text and "| policy λ=0.05 (cosine) | 0 |" in text
    assert "| occ | 1 |" not in text  # the reference contributes only the experiment's own seeds
    assert "Paired test against occ" in text
    assert (tmp_path / "e02" / "fig_lambda_sweep.png").exists() and "fig_lambda_sweep.png" in text


def test_readme_results_are_the_generated_reports():
    """Every `<!-- generated: FILE -->` block of experiments/README.md is FILE as `report.py --readme` splices it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", REPO / "experiments" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    readme = (REPO / "experiments" / "README.md").read_text()
    blocks = re.findall(r"<!-- generated: (\S+) -->\n(.*?)\n<!-- end generated -->", readme, re.S)
    assert {f"experiments/out/{e}/report.md" for e in ("e01", "e02", "e03", "e04")} <= {f for f, _ in blocks}
    for path, block in blocks:
        assert block == report.generated_block((REPO / path).read_text()), f"{path} differs from its README block"


def test_readme_shows_each_experiments_figures_inline():
    """Each reported experiment's answer has its key figures as markdown images, and every image exists."""
    readme = (REPO / "experiments" / "README.md").read_text()
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", readme)
    for exp in ("e01", "e02", "e03", "e04"):
        assert any(f"out/{exp}/fig_" in path for path in images), f"no inline figure for {exp}"
    for path in images:
        assert (REPO / "experiments" / path).is_file(), path


def test_report_of_a_calibration_sweep(tmp_path):
    """e04's report: head_ce splits a regime's rows, its effect is tested with vs without, λ's trajectory, the
    MTP head before/after RL, the population c and the cost per configuration, all from the fixture's closed forms."""
    import numpy as np
    from fixtures_runs import HELD_OUT_ACCEPT, SEEDS, STEPS, mtp_accept, occ_metrics, write_calibration_sweep

    write_calibration_sweep(tmp_path / "runs")
    text = _report(tmp_path / "runs" / "calibration", tmp_path / "e04", "--pooled-only", "--seeds", "0", "1", "7")
    assert "8 runs from" in text and "## Table 1 (regimes)" in text  # no Table 2: policy is absent
    assert "| detach | 0 |" not in text and "| occ | 2 | " in text  # pooled rows only
    assert "| occ +head_ce=0.1 | 2 | " in text  # against detach (head_ce 0)
    effect = text.split("## The MTP head's own CE")[1].split("##")[0]
    assert "| detach | 2 | " in effect and "| occ | 2 | " in effect
    # λ at the start, middle and end (10 steps: windows of one step at 1, 5, 10), mean over seeds
    lam = {s: np.mean([occ_metrics(seed, s, False)["occ/lambda"] for seed in SEEDS]) for s in (1, 5, STEPS)}
    assert "| run | steps 1–1 | steps 5–5 | steps 10–10 | steps with λ < 0 |" in text
    assert f"| occ | {lam[1]:.3g} | {lam[5]:.3g} | {lam[STEPS]:.3g} | 0% |" in text
    assert "| detach | " not in text.split("## λ over training")[1].split("##")[0]  # fixed λ: not a trajectory
    assert (tmp_path / "e04" / "fig_lambda_trajectories.png").exists()
    ce = np.mean([2.0 / s for s in range(1, STEPS + 1)])
    accept = np.mean([mtp_accept(0.1, s) for s in range(1, STEPS + 1)])
    assert (f"| detach +head_ce=0.1 | {ce:.4f} → {ce:.4f} | {accept:.4f} → {accept:.4f} | "
            f"{HELD_OUT_ACCEPT + 0.1:.4f} |") in text
    population = text.split("Population c")[1]
    assert "| occ | 0 | 9 | " in population and "| -1.00 | 0.00 |" in population  # c_cross = −ĉ from step 2
    assert "| occ +head_ce=0.1 | 45.000 ± 0.000 | 5.62 |" in text and "| detach | 8.000 ± 0.000 | 1.00 |" in text
    one_seed = _report(tmp_path / "runs" / "calibration", tmp_path / "e04_s0", "--seeds", "0")
    assert "4 runs from" in one_seed and "| occ | 0 |" in one_seed  # per-seed paired rows without --pooled-only


def test_the_base_line_is_the_mean_of_each_seeds_own_base_evaluation(tmp_path):
    """Every run starts from one base, but each seed samples its evaluation with its own stream: the report
    averages one base evaluation per seed (not whichever run it finds first)."""
    from fixtures_runs import write_calibration_sweep

    avg = {0: 0.40, 1: 0.46}  # two seeds' base scores; every configuration of a seed has the same one
    for d in write_calibration_sweep(tmp_path / "runs"):
        seed = int(d.name.rsplit("_s", 1)[1])  # fixture names end in _s<seed>
        base = d / "eval" / "base" / "summary.json"
        base.parent.mkdir(parents=True, exist_ok=True)
        base.write_text(json.dumps({"average": {"avg": avg[seed], "pass": avg[seed] + 0.3, "maj": avg[seed] + 0.1}}))
    text = _report(tmp_path / "runs" / "calibration", tmp_path / "e04", "--pooled-only")
    assert "its evaluation mean over 2 seeds): avg 43.0, pass 73.0, maj 53.0." in text
    one = _report(tmp_path / "runs" / "calibration", tmp_path / "e04_s1", "--pooled-only", "--seeds", "1")
    assert "its evaluation seed 1): avg 46.0, pass 76.0, maj 56.0." in one
