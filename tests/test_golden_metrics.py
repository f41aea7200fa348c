"""A short default run's metrics are pinned: `metrics.jsonl` minus `time/*` (and the final evaluation's
summary) must equal, bit for bit, the file recorded in `tests/data/golden_metrics.jsonl`. Refactors that
claim to change no behaviour are held to it; a deliberate change regenerates the file
(`python tests/test_golden_metrics.py --write`) and says why in its commit.

The run covers the default regime (occ) with gradient accumulation (so OCC's once-per-update pass runs),
the exact diagnostics, a checkpoint and the final evaluation. The numbers depend on the CPU kernel family,
which `import mtp_occ` pins (AVX2 on x86-64; on another architecture the test skips and says so), and on the
intra-op thread count, which the run pins (`threads=2`; pre-training pins its own). The base is pre-trained
afresh in a cache of the run's own: a base cached by another process (another commit's code, another
test's environment) never stands in for the one this commit computes."""

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
GOLDEN_CPU = GOLDEN.with_suffix(".cpu.json")  # the recording machine's CPU (run.json env.cpu), for the message
ARGS = [*TINY, "steps=3", "save_every=2", "algo.micro_batch_size=4", "diagnostics.every=2", "name=golden",
        "threads=2"]
VOLATILE = ("time/",)


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def record(run_root: Path) -> tuple[list[dict], dict]:
    """The run's stable metric rows plus the final evaluation, and the CPU it ran on."""
    env = {**os.environ, "WANDB_MODE": "disabled", "MTP_OCC_CACHE": str(run_root / "cache")}
    env.pop("MTP_OCC_CPU_KERNELS", None)
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", *ARGS, f"run_root={run_root}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    run_dir = run_root / "golden"
    rows = [_stable(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    cpu = json.loads((run_dir / "run.json").read_text())["env"]["cpu"]
    return [*rows, {"final_eval": summary["benchmarks"]}], cpu


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the golden file was recorded with x86-64 AVX2 kernels")
def test_a_short_default_run_reproduces_the_golden_metrics(tmp_path):
    want = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    got, cpu = record(tmp_path)
    recorded_on = json.loads(GOLDEN_CPU.read_text())
    where = "" if cpu == recorded_on else f" (recorded on {recorded_on}, run on {cpu})"
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k] == w[k], f"step {w.get('step')}: {k} = {g[k]}, golden {w[k]}{where}"


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_metrics.py --write")
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory() as d:
        rows, cpu = record(Path(d))
    GOLDEN.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    GOLDEN_CPU.write_text(json.dumps(cpu, indent=1) + "\n")
    print(f"wrote {GOLDEN} ({len(rows)} rows)")
