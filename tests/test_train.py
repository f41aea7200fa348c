"""The training loop end to end on a tiny model: every regime moves parameters, OCC's λ is non-zero,
detach keeps the shared weights independent of the MTP loss, a killed run resumes to identical
metrics, and the four-regime multirun writes four complete run dirs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtp_occ.config import compose
from mtp_occ.regimes import REGIME_CONFIGS
from mtp_occ.train import train

REPO = Path(__file__).resolve().parent.parent
# a two-term, one-digit task: a 150-step pre-training gives a base with mixed rewards in every batch
TINY = ["data.n_terms=2", "data.min_operand=1", "data.max_operand=9", "data.heldout_size=64",
        "model.pretrain.steps=150", "algo.prompts_per_step=8", "algo.group_size=4", "algo.updates_per_step=2",
        "algo.lr=1e-3", "rollout.max_new_tokens=16", "eval.limit=16", "eval.k=2", "eval.n_boot=50",
        "eval.max_new_tokens=16", "steps=2", "save_every=1", "wandb.mode=disabled"]
REQUIRED = {"reward/mean", "loss/pg", "loss/mtp", "mtp/ce", "mtp/lambda", "time/step_s", "time/rollout_s",
            "time/update_s"}


def _run(tmp_path, *extra):
    cfg = compose([*TINY, f"run_root={tmp_path}", *extra])
    out = train(cfg, [*TINY, *extra])
    return cfg, out


def _weights(run_dir: Path, step: int) -> dict:
    from mtp_occ.checkpoint import model_weights

    return model_weights(run_dir / "checkpoints" / f"step_{step:06d}")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(REGIME_CONFIGS))
def test_smoke_every_regime(tmp_path, name):
    cfg, out = _run(tmp_path, f"regime={name}", "name=smoke", "keep_checkpoints=0")
    run_dir = Path(out["run_dir"])
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert REQUIRED <= set(rows[0])
    first, last = _weights(run_dir, 1), _weights(run_dir, 2)
    moved = [k for k in first if not torch.equal(first[k], last[k])]
    assert any(k.startswith("mtp.") for k in moved), "MTP layers did not train"
    assert any(k.startswith("lm.model.layers") for k in moved), "backbone did not train"
    assert (run_dir / "eval" / "summary.json").exists() and out["final_eval"]["benchmarks"]["arith"]["n"] == 16
    if REGIME_CONFIGS[name].calibrated:
        assert any(r["occ/lambda"] != 0.0 for r in rows)
    if REGIME_CONFIGS[name].calibrated and not REGIME_CONFIGS[name].exact_gradients:
        assert {"occ/c_hat", "occ/v2_hat", "occ/valid_frac", "mtp/clipfrac"} <= set(rows[0])
    if REGIME_CONFIGS[name].exact_gradients:
        assert {"occ/c", "occ/v2", "occ/cos", "mtp/clipfrac"} <= set(rows[0])


def test_detach_shared_weights_do_not_depend_on_the_mtp_loss(tmp_path):
    _, a = _run(tmp_path, "regime=detach", "name=a")
    _, b = _run(tmp_path, "regime=detach", "regime.lam=0.0", "name=b")
    wa, wb = _weights(Path(a["run_dir"]), 2), _weights(Path(b["run_dir"]), 2)
    shared = [k for k in wa if not k.startswith("mtp.")]
    assert shared and all(torch.equal(wa[k], wb[k]) for k in shared)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if k.startswith("mtp.")), "λ had no effect at all"


def test_joint_regime_shared_weights_do_depend_on_the_mtp_loss(tmp_path):
    _, a = _run(tmp_path, "regime=ce", "regime.lam=0.5", "name=a")
    _, b = _run(tmp_path, "regime=ce", "regime.lam=0.0", "name=b")
    wa, wb = _weights(Path(a["run_dir"]), 2), _weights(Path(b["run_dir"]), 2)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if k.startswith("lm.model.layers"))


def _cli(args, run_root, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    flags = [a for a in args if a.startswith("-")]  # Hydra's flags first, overrides after TINY (later wins)
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.Popen([sys.executable, "-m", "mtp_occ.run", *flags, *TINY, f"run_root={run_root}", *overrides],
                            cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tmp_path):
    args = ["regime=occ", "steps=5", "name=resume"]
    ref = _cli(args, tmp_path / "ref")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    victim = _cli(args, tmp_path / "killed")
    metrics = tmp_path / "killed" / "resume" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    again = _cli(args, tmp_path / "killed")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "resumed from" in out
    a, b = _metrics(tmp_path / "ref" / "resume"), _metrics(tmp_path / "killed" / "resume")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert _strip_times(a) == _strip_times(b)


@pytest.mark.slow
def test_four_regime_multirun_writes_four_complete_run_dirs(tmp_path):
    p = _cli(["-m", "regime=detach,ce,policy,occ"], tmp_path)
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out
    assert (tmp_path / "multirun.yaml").exists()
    dirs = sorted(p.parent for p in tmp_path.glob("*/run.json"))
    assert len(dirs) == 4, dirs
    for name in ("detach", "ce", "policy", "occ"):
        (d,) = [p for p in dirs if p.name.startswith(f"regime={name},")]  # the swept key leads the name
        run = json.loads((d / "run.json").read_text())
        assert run["status"] == "finished" and run["name"] == d.name
        assert f"regime={name}" in (d / "overrides.txt").read_text().splitlines()
        assert (d / "config.yaml").exists() and (d / "eval" / "summary.json").exists()
        assert (d / "eval" / "samples.jsonl").exists() and (d / "checkpoints" / "latest").exists()
        rows = _metrics(d)
        assert [r["step"] for r in rows] == [1, 2] and REQUIRED <= set(rows[-1])


def test_rl_seeds_share_one_base_and_one_heldout_set():
    from mtp_occ.eval.policy import build_benchmarks
    from mtp_occ.tasks.pretrain import base_key

    a, b = compose([*TINY, "seed=0"]), compose([*TINY, "seed=1"])
    assert base_key(a.model, a.data, a.model.pretrain.seed) == base_key(b.model, b.data, b.model.pretrain.seed)
    assert build_benchmarks(a.eval, a.data)[0].problems == build_benchmarks(b.eval, b.data)[0].problems
    c = compose([*TINY, "model.pretrain.seed=1"])
    assert base_key(c.model, c.data, c.model.pretrain.seed) != base_key(a.model, a.data, a.model.pretrain.seed)


def test_a_resumed_run_reports_the_base_score_not_its_checkpoint(tmp_path):
    cfg = compose([*TINY, f"run_root={tmp_path}", "name=r", "regime=occ"])
    first = train(cfg, TINY)
    cfg3 = compose([*TINY, f"run_root={tmp_path}", "name=r", "regime=occ", "steps=3"])
    import shutil

    (Path(first["run_dir"]) / "eval" / "base" / "summary.json").unlink()  # force a re-evaluation on resume
    for cached in Path(os.environ["MTP_OCC_CACHE"]).glob("bases/*/eval_*"):
        shutil.rmtree(cached)
    again = train(cfg3, TINY)
    assert again["base_eval"]["benchmarks"] == first["base_eval"]["benchmarks"]


def test_each_rl_seed_gets_the_base_evaluation_of_its_own_sampling_stream(tmp_path):
    """Seeds share the base model and its cache, not its evaluation: a run never reports the base score
    that another seed's run sampled (its summary says which seed it was sampled with); a second run of
    the same seed gets the same base evaluation."""
    one = train(compose([*TINY, f"run_root={tmp_path}", "name=s1", "seed=1", "steps=1"]), TINY)
    zero = train(compose([*TINY, f"run_root={tmp_path}", "name=s0", "seed=0", "steps=1"]), TINY)
    again = train(compose([*TINY, f"run_root={tmp_path}", "name=s0b", "seed=0", "steps=1"]), TINY)
    assert one["base_eval"]["settings"]["seed"] == 1 and zero["base_eval"]["settings"]["seed"] == 0
    assert again["base_eval"] == zero["base_eval"]
    on_disk = json.loads((tmp_path / "s0b" / "eval" / "base" / "summary.json").read_text())
    assert on_disk["settings"]["seed"] == 0


def test_the_base_is_the_same_bits_whatever_threads_the_caller_runs_on(tmp_path):
    """Pre-training pins `model.pretrain.threads` (the thread count changes the base's bits: shown by the
    second half) and hands the caller's thread count back."""
    from mtp_occ.tasks.pretrain import pretrain

    short = [*TINY, "model.pretrain.steps=30"]
    cfg = compose(short)
    before = torch.get_num_threads()
    weights = {}
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            pretrain(cfg.model, cfg.data, 0, tmp_path / f"caller{caller}")
            assert torch.get_num_threads() == caller
            weights[caller] = (tmp_path / f"caller{caller}" / "model.safetensors").read_bytes()
        one = compose([*short, "model.pretrain.threads=1"])
        pretrain(one.model, one.data, 0, tmp_path / "pinned1")
    finally:
        torch.set_num_threads(before)
    assert weights[1] == weights[2]
    assert (tmp_path / "pinned1" / "model.safetensors").read_bytes() != weights[2]


@pytest.mark.slow
def test_a_bf16_run_stays_finite_and_close_to_the_float32_one(tmp_path):
    """`model.dtype=bfloat16` (the production dtype) on CPU: the same base loaded in bf16 trains through
    occ's per-update λ, the chunked bf16 head and the optimizer with every logged number finite, and its
    first step (same prompts, its own samples) stays close to the float32 run's."""
    import math

    args = ("regime=occ", "eval.enabled=false", "steps=2")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        _, out = _run(tmp_path / dtype, *args, f"model.dtype={dtype}", f"name={dtype}")
        rows[dtype] = _metrics(Path(out["run_dir"]))
    assert [r["step"] for r in rows["bfloat16"]] == [1, 2]
    assert all(math.isfinite(v) for r in rows["bfloat16"] for v in r.values() if isinstance(v, float))
    fp32, bf16 = rows["float32"][0], rows["bfloat16"][0]
    print({k: (fp32[k], bf16[k]) for k in ("mtp/ce", "reward/acc", "loss/pg", "mtp/lambda")})
    assert abs(bf16["mtp/ce"] - fp32["mtp/ce"]) < 0.1 * fp32["mtp/ce"]
    assert abs(bf16["reward/acc"] - fp32["reward/acc"]) < 0.25
