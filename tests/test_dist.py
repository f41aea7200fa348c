"""Data parallelism: `torchrun --nproc_per_node 2` on CPU (gloo) computes the same update as one process
with the same global batch, for every regime."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY

REPO = Path(__file__).resolve().parent.parent
EXACT = ("reward/mean", "reward/acc", "occ/lambda", "occ/c_hat", "occ/v2_hat", "mtp/lambda")
CLOSE = ("loss/pg", "loss/mtp", "mtp/ce", "grad/norm", "grad/mtp_norm")  # per-rank token means (clipfrac, kl) are averaged, not exact


def _run(tmp_path: Path, nproc: int, regime: str, *extra: str) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + os.getpid() % 1000 + nproc)] if nproc > 1 else [sys.executable]
    root = tmp_path / f"np{nproc}"
    p = subprocess.run([*launcher, "-m", "mtp_occ.run", *TINY, "steps=3", "eval.enabled=false", f"regime={regime}",
                        f"run_root={root}", "name=dp", *extra], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return [json.loads(line) for line in (root / "dp" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["detach", "ce", "policy", "occ"])
def test_two_processes_match_one(tmp_path, regime):
    one, two = _run(tmp_path, 1, regime), _run(tmp_path, 2, regime)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        for k in EXACT + CLOSE:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


@pytest.mark.slow
def test_one_group_per_rank_still_fills_every_update(tmp_path):
    """2 prompts, 2 updates, 2 ranks: each rank holds one group, which belongs to update 0 on rank 0 and to
    update 1 on rank 1 (a rank-local stride would put both in update 0 and leave update 1 empty)."""
    extra = ("algo.prompts_per_step=2", "algo.updates_per_step=2")
    one, two = _run(tmp_path, 1, "occ", *extra), _run(tmp_path, 2, "occ", *extra)
    for a, b in zip(one, two, strict=True):
        for k in EXACT + CLOSE:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)


def _run_eval(root: Path, nproc: int, *extra) -> Path:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29400 + os.getpid() % 100)] if nproc > 1 else [sys.executable]
    p = subprocess.run([*launcher, "-m", "mtp_occ.run", *TINY, "steps=1", "regime=occ", f"run_root={root}", "name=ev",
                        *extra], cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return root / "ev" / "eval"


@pytest.mark.slow
def test_evaluation_under_zero3_with_two_processes_matches_one(tmp_path):
    """Every rank generates its block of the eval prompts (ZeRO-3's forward needs all ranks), rank 0 grades:
    the base and final evaluations equal a single process's, sample for sample."""
    # bootstrap sizes no other test uses: the base-eval cache keys differ, so both runs really compute it
    one = _run_eval(tmp_path / "one", 1, "eval.n_boot=52")
    two = _run_eval(tmp_path / "two", 2, "deepspeed=zero3", "eval.n_boot=51")
    for sub in ("base", "."):
        a = [json.loads(line) for line in (one / sub / "samples.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (two / sub / "samples.jsonl").read_text().splitlines()]
        assert len(a) == len(b) == 16 * 2
        assert [(r["id"], r["sample"], r["completion"]) for r in a] == [(r["id"], r["sample"], r["completion"]) for r in b]
        sa, sb = (json.loads((d / sub / "summary.json").read_text()) for d in (one, two))
        assert sb["average"]["avg"] == pytest.approx(sa["average"]["avg"]), sub


def _build_base(rank: int, world: int, port: int, cache: str, out: str) -> None:
    """One rank of `test_the_base_is_written_whole_when_rank_1_gets_there_first` (spawned)."""
    import time

    import torch.distributed as dist

    from mtp_occ.config import compose
    from mtp_occ.policy import build_policy

    os.environ.update(MTP_OCC_CACHE=cache, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if rank == 0:
            time.sleep(3)  # rank 1 reaches the cache's file lock first
        cfg = compose([*TINY, "model.pretrain.steps=5"])
        model, _, base = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)
        Path(out, f"rank{rank}").write_text(json.dumps({"base": str(base), "files": sorted(os.listdir(base))}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_the_base_is_written_whole_when_rank_1_gets_there_first(tmp_path):
    """A cold base cache under two ranks: transformers' `save_pretrained` writes nothing on a rank other than
    0, so a base pre-trained by rank 1 (the first to take the file lock) had no config or weights and every
    rank failed to load it. Rank 0 now fills the cache first (`dist.main_rank_first`)."""
    import torch.multiprocessing as mp

    mp.spawn(_build_base, args=(2, 29900 + os.getpid() % 90, str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]
    assert {"config.json", "model.safetensors", "mtp.safetensors", "pretrain.json"} <= set(seen[0]["files"])
