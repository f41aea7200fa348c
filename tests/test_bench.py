"""The benchmark's plumbing: `python -m mtp_occ.bench --quick` writes results.json / results.md with every
documented key, finite positive numbers, the configs and the machine. Timings and speedups are never
asserted (they depend on the machine and its load)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtp_occ import bench
from mtp_occ.config import compose

REPO = Path(__file__).resolve().parent.parent
RATIOS = [f"{r}_over_detach{s}" for r in ("occ", "policy", "ce", "diag") for s in ("", "_step")]
REQUIRED = {*RATIOS, "trl_speedup", "reward_pool_speedup", "rollout_tokens_per_s", "pool_recovery_s",
            "serial_verdicts_per_s", "detach_update_s", "detach_step_s", "machine", "configs", "gpu", "details"}


def _run_quick(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtp_occ.bench", "--quick", "--out", str(out), *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".md").exists()
    return json.loads(out.read_text())


def _numbers(res: dict) -> dict[str, float]:
    return {k: v for k, v in res.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _assert_finite_positive(res: dict) -> None:
    # differences (`*_err`) may be exactly 0; every other figure is a positive rate, ratio or time
    bad = {k: v for k, v in _numbers(res).items() if not (math.isfinite(v) and (v > 0 or k.endswith("_err") and v == 0))}
    assert not bad, f"non-finite or non-positive figures: {bad}"


def test_quick_run_writes_every_key(tmp_path):
    res = _run_quick(tmp_path)
    assert REQUIRED <= set(res), sorted(REQUIRED - set(res))
    _assert_finite_positive(res)
    assert all(k in _numbers(res) for k in RATIOS)
    assert res["trl_speedup"] is None and "--quick" in res["trl_error"]  # skipped, and says why
    assert {"cpu", "cores", "torch", "threads", "loadavg_start", "loadavg_end"} <= set(res["machine"])
    assert res["configs"]["quick"] is True and "algo.group_size=4" in res["configs"]["overrides"]
    assert set(res["configs"]["regime_overrides"]) == {"detach", "ce", "policy", "occ"}
    if not torch.cuda.is_available():
        assert res["gpu"] == {"skipped": "no CUDA"}
    rew = res["details"]["rewards"]
    assert rew["hostile_timed_out"] and rew["after_score"] == 1.0 and rew["serial_pool_agree"] == 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| `occ_over_detach` |" in md and "| `reward_pool_speedup` |" in md


@pytest.mark.slow
def test_quick_run_with_trl(tmp_path):
    pytest.importorskip("trl")
    res = _run_quick(tmp_path, "--with-trl")
    assert "trl_error" not in res, res.get("trl_error")
    _assert_finite_positive(res)
    for k in ("trl_speedup", "trl_speedup_occ", "trl_s_per_step", "ours_detach_s_per_step", "trl_tokens_per_s"):
        assert k in _numbers(res)
    cfg = res["configs"]["trl_grpo_config"]
    assert cfg["num_generations"] == 4 and cfg["steps_per_generation"] == 2 and cfg["num_iterations"] == 1


def test_trl_config_matches_our_step():
    cfg = compose(["algo.prompts_per_step=64", "algo.group_size=8", "algo.updates_per_step=4"])
    kw = bench.trl_config(cfg, "/tmp/x", cycles=3)
    assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == 64 * 8  # one generation = our batch
    assert kw["steps_per_generation"] == 4 and kw["num_iterations"] == 1 and kw["gradient_accumulation_steps"] == 1
    assert kw["num_generations"] == 8 and kw["max_completion_length"] == cfg.rollout.max_new_tokens
    assert kw["max_steps"] == 12 and kw["beta"] == 0.0 and kw["epsilon_high"] == cfg.algo.clip_high


def test_trl_reward_grades_like_the_exact_grader():
    assert bench.trl_reward(["1+2=3;\\boxed{3}", "\\boxed{4}", "no box 3", "\\boxed{3"], ["3", "3", "3", "3"]) == [
        1.0, 0.0, 0.0, 0.0]


def test_round_ratios_are_medians_of_within_round_ratios():
    times = {"detach": [1.0, 2.0, 4.0], "occ": [1.0, 3.0, 4.0]}
    assert bench.round_ratios(times) == {"occ": 1.0}
    assert bench.ratio_spread(times) == {"occ": [1.0, 1.5]}


def test_rounds_rotate_the_order():
    orders = [[v[0] for v in bench.rotated(bench.VARIANTS, r)] for r in range(len(bench.VARIANTS))]
    assert {o[0] for o in orders} == {v[0] for v in bench.VARIANTS}
    assert all(sorted(o) == sorted(orders[0]) for o in orders)


def test_reward_items_mix_right_wrong_and_unparseable(data_dir):
    comps, golds, _ = bench.reward_items(8)
    assert len(comps) == len(golds) == 8
    assert golds[0] in comps[0] and "\\boxed" not in comps[2]


def test_gpu_only_mode_says_why_it_cannot_run_here(tmp_path):
    """`--gpu-only` is what tests/gpu/run_gpu_checks.sh calls: without CUDA it records why and exits 1."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "mtp_occ.bench", "--gpu-only", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the GPU section runs for real in tests/gpu/run_gpu_checks.sh")
    assert proc.returncode == 1 and "GPU section not run: no CUDA" in proc.stderr
    assert json.loads(out.read_text())["gpu"] == {"skipped": "no CUDA"}
