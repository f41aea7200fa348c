"""`python -m mtp_occ.eval` on a trained tiny run, over all six local benchmark files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import _run

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_eval_cli_on_a_run_dir_over_the_six_benchmarks(tmp_path, data_dir):
    _, out = _run(tmp_path, "regime=detach", "name=evalme")
    run_dir = Path(out["run_dir"])
    extra = ["eval=math6", "eval.limit=2", "eval.k=2", "eval.max_new_tokens=8", "eval.template=plain",
             "eval.n_boot=20", f"eval.data_dir={data_dir / 'benchmarks'}"]
    p = subprocess.run([sys.executable, "-m", "mtp_occ.eval", str(run_dir), *extra, "--out", str(tmp_path / "ev")],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"}
    assert all(b["n"] == 2 and b["k"] == 2 for b in summary["benchmarks"].values())
    lines = (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 2 * 2
    assert summary["settings"]["max_new_tokens"] == 8 and summary["settings"]["limit"] == 2


def test_eval_cli_rejects_a_target_that_is_neither(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mtp_occ.eval", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "neither a run dir" in p.stderr
