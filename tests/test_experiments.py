"""Every experiment file composes; the paper variants pass a dry run (compose + batch arithmetic +
the derived DeepSpeed config for the paper's 128 GPUs)."""

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
    assert {f"experiments/out/{e}/report.md" for e in ("e01", "e02", "e03")} <= {f for f, _ in blocks}
    for path, block in blocks:
        assert block == report.generated_block((REPO / path).read_text()), f"{path} differs from its README block"


def test_readme_shows_each_experiments_figures_inline():
    """Each reported experiment's answer has its key figures as markdown images, and every image exists."""
    readme = (REPO / "experiments" / "README.md").read_text()
    images = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", readme)
    for exp in ("e01", "e02", "e03"):
        assert any(f"out/{exp}/fig_" in path for path in images), f"no inline figure for {exp}"
    for path in images:
        assert (REPO / "experiments" / path).is_file(), path
