"""A short default run's metrics are pinned: `metrics.jsonl` minus `time/*` (and the final evaluation's
summary) must equal, bit for bit, the file recorded in `tests/data/golden_metrics.jsonl`. Refactors that
claim to change no behaviour are held to it; a deliberate change regenerates the file
(`python tests/test_golden_metrics.py --write`) and says why in its commit.

The run covers the default regime (occ) with gradient accumulation (so OCC's once-per-update pass runs),
the exact diagnostics, a checkpoint and the final evaluation. The numbers depend on the CPU kernel family,
which `import mtp_occ` pins (AVX2 on x86-64); on another architecture the test skips and says so."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "golden_metrics.jsonl"
ARGS = [*TINY, "steps=3", "save_every=2", "algo.micro_batch_size=4", "diagnostics.every=2", "name=golden"]
VOLATILE = ("time/",)


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def record(run_root: Path) -> list[dict]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("MTP_OCC_CPU_KERNELS", None)
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", *ARGS, f"run_root={run_root}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    run_dir = run_root / "golden"
    rows = [_stable(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    return [*rows, {"final_eval": summary["benchmarks"]}]


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the golden file was recorded with x86-64 AVX2 kernels")
def test_a_short_default_run_reproduces_the_golden_metrics(tmp_path):
    want = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    got = record(tmp_path)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k] == w[k], (w.get("step"), k, g[k], w[k])


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_metrics.py --write")
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as d:
        rows = record(Path(d))
    GOLDEN.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {GOLDEN} ({len(rows)} rows)")
