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


def _run(tmp_path: Path, nproc: int, regime: str) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + os.getpid() % 1000 + nproc)] if nproc > 1 else [sys.executable]
    root = tmp_path / f"np{nproc}"
    p = subprocess.run([*launcher, "-m", "mtp_occ.run", *TINY, "steps=3", "eval.enabled=false", f"regime={regime}",
                        f"run_root={root}", "name=dp"], cwd=REPO, capture_output=True, text=True, timeout=600,
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
