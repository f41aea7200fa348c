"""`rollout=vllm_cpu` end to end with the real engine (marked `vllm`, see tests/conftest.py): a run SIGKILLed
mid-way resumes to the metrics of an uninterrupted run (rollouts, old log-probs and updates all go through
the engine and its per-step weight sync; evaluation at the start and the end runs through the engine too),
and two data-parallel ranks each run their own engine (`external_launcher`, gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtp_occ import checkpoint

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
# the embedded task at test size; head size 32 (d=64, 2 heads): vLLM's CPU attention needs >= 32
TINY = ["data.n_terms=2", "data.min_operand=1", "data.max_operand=9", "data.heldout_size=64",
        "model.pretrain.steps=150", "model.num_heads=2", "algo.prompts_per_step=8", "algo.group_size=4",
        "algo.updates_per_step=2", "algo.lr=1e-3", "rollout=vllm_cpu", "rollout.max_new_tokens=16",
        "eval.limit=16", "eval.k=2", "eval.n_boot=50", "eval.max_new_tokens=16", "save_every=1",
        "wandb.mode=disabled", "regime=occ"]


def _cli(run_root: Path, *extra: str, nproc: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29300 + os.getpid() % 300)] if nproc > 1 else [sys.executable]
    return subprocess.Popen([*launcher, "-m", "mtp_occ.run", *TINY, f"run_root={run_root}", *extra], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_killed_vllm_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    args = ("steps=3", "name=resume")
    _finish(_cli(tmp_path / "ref", *args))
    victim = _cli(tmp_path / "killed", *args)
    ckpts = tmp_path / "killed" / "resume" / "checkpoints"
    deadline = time.time() + 400
    while time.time() < deadline and victim.poll() is None:
        if ckpts.exists() and checkpoint.latest(ckpts) is not None:  # killed after step 1's checkpoint
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out = _finish(_cli(tmp_path / "killed", *args))
    assert "resumed from" in out
    ref, resumed = _metrics(tmp_path / "ref" / "resume"), _metrics(tmp_path / "killed" / "resume")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert _without_times(resumed) == _without_times(ref)
    # every step's rollouts came from an engine holding the trainer's current weights
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in ref), [r["rollout/logprob_mismatch"] for r in ref]
    final = json.loads((tmp_path / "ref" / "resume" / "eval" / "summary.json").read_text())
    base = json.loads((tmp_path / "ref" / "resume" / "eval" / "base" / "summary.json").read_text())
    assert final and base  # both evaluations ran (through the engine)
    run = json.loads((tmp_path / "killed" / "resume" / "run.json").read_text())
    assert run["status"] == "finished"


def test_two_data_parallel_ranks_each_run_an_engine(tmp_path):
    out = _finish(_cli(tmp_path, "steps=2", "name=dp2", nproc=2))
    assert "Error" not in out.split("run dir:")[-1], out[-3000:]  # the engines shut down before the groups
    rows = _metrics(tmp_path / "dp2")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_mismatch"] < 1e-4 for r in rows)
    assert (tmp_path / "dp2" / "eval" / "summary.json").exists()


def test_an_engine_left_unsynced_stops_the_run_before_its_first_update(tmp_path, monkeypatch):
    """A sync that writes nothing (the policy loader replaced by a no-op) leaves the engine on its start-up
    placeholders (`load_format=dummy`): the probe after the sync stops the run before any rollout is
    trained on, with a message naming that cause; no metrics row is written."""
    import mtp_occ.rollout.vllm as vllm_mod
    from mtp_occ.config import compose
    from mtp_occ.train import train

    monkeypatch.setattr(vllm_mod, "load_policy", lambda runner, weights: None)
    cfg = compose([*TINY, f"run_root={tmp_path}", "name=unsynced", "steps=2", "eval.enabled=false"])
    with pytest.raises(vllm_mod.WeightSyncError, match=r"placeholder weights .* never synced"):
        train(cfg, [])
    run_dir = tmp_path / "unsynced"
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
