"""Synthetic run dirs with known numbers, for the logger, analysis and notebook tests.

`write_sweep(root)` lays out what a real sweep leaves behind, through the real `RunLogger`:

    root/main/multirun.yaml
    root/main/<regime>_s<seed>/{run.json, overrides.txt, config.yaml, metrics.jsonl,
                                eval/summary.json, eval/samples.jsonl}     4 regimes x 2 seeds
    root/ablation/policy_lam<λ>_<schedule>_s0/...                          Table 2's extra policy runs

`write_calibration_sweep(root)` lays out an e04-like sweep: {detach, occ} × head_ce {0, 0.1} × 2 seeds,
with `mtp/lambda`, `mtp/accept`, the exact diagnostics at every step of the occ runs (`diag/c_cross`
included) and the held-out acceptance proxy (`extra.mtp_accept`).

Every number is a closed form of (regime, seed, step, benchmark) below, so a test can compute what a
table or figure must show by hand. Runs named in `wandb_runs` also log a real wandb offline run (the
caller sets WANDB_DIR etc.; by default the files land in `<run_dir>/wandb/`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from mtp_occ.eval.runner import flat_metrics
from mtp_occ.log import RunLogger, update_run_json
from mtp_occ.rundir import RunDir

REGIMES = ("detach", "ce", "policy", "occ")
SEEDS = (0, 1)
BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
STEPS = 10  # steps 1..STEPS; evaluations at EVAL_STEPS, diagnostics (occ only) at DIAG_STEPS
EVAL_STEPS = (5, 10)
DIAG_STEPS = (5, 10)

# final avg@k of benchmark i = BASE[regime] + SEED_OFFSET[seed] + 0.01 * i; the seed mean is BASE + 0.01 i
BASE = {"detach": 0.589, "ce": 0.477, "policy": 0.574, "occ": 0.617}
SEED_OFFSET = {0: -0.01, 1: 0.01}
ABLATION = {(0.3, "constant"): 0.55, (0.05, "cosine"): 0.56}  # extra policy runs, seed 0 only
STEP_TIME = {"detach": 8.0, "ce": 8.2, "policy": 8.4, "occ": 8.1}  # time/step_s of a plain step
DIAG_TIME = 45.0  # time/step_s of a step that also ran the exact diagnostics


def eval_value(base: float, seed: int, bench_index: int) -> float:
    return base + SEED_OFFSET[seed] + 0.01 * bench_index


def reward(regime: str, seed: int, step: int) -> float:
    return 0.2 + 0.1 * REGIMES.index(regime) + 0.01 * step + SEED_OFFSET[seed]


def occ_metrics(seed: int, step: int, diag: bool) -> dict[str, float]:
    c_hat, v2_hat = 0.05 * (1 + seed) / step, 0.2 + 0.01 * step
    out = {"occ/lambda": c_hat / v2_hat, "occ/c_hat": c_hat, "occ/v2_hat": v2_hat, "occ/valid_frac": 0.9}
    if diag:  # exact = 2 x proxy: Pearson r = 1, full sign agreement
        out |= {"diag/c_hat": c_hat, "diag/v2_hat": v2_hat, "diag/c": 2 * c_hat, "diag/v2": 3 * v2_hat,
                "diag/cos": 0.1}
    return out


def write_sweep(root: Path, wandb_runs: tuple[str, ...] = ()) -> list[Path]:
    """Write the sweep; returns the run dirs."""
    (root / "main").mkdir(parents=True, exist_ok=True)
    (root / "main" / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    dirs = [write_run(root / "main", r, s, lam=0.1, schedule="constant", base=BASE[r], wandb_runs=wandb_runs)
            for r in REGIMES for s in SEEDS]
    for (lam, schedule), base in ABLATION.items():
        dirs.append(write_run(root / "ablation", "policy", 0, lam=lam, schedule=schedule, base=base,
                              wandb_runs=wandb_runs))
    return dirs


CALIBRATION_REGIMES = ("detach", "occ")
HEAD_CE = (0.0, 0.1)


def mtp_accept(head_ce: float, step: int) -> float:
    """Training `mtp/accept` of a calibration-sweep run; the held-out value is `HELD_OUT_ACCEPT + head_ce`."""
    return 0.5 + head_ce + 0.001 * step


HELD_OUT_ACCEPT = 0.6


def write_calibration_sweep(root: Path) -> list[Path]:
    """Write the e04-like sweep under `root/calibration`; returns the run dirs."""
    sweep = root / "calibration"
    sweep.mkdir(parents=True, exist_ok=True)
    return [write_run(sweep, r, s, lam=0.1, schedule="constant", base=BASE[r], head_ce=h)
            for r in CALIBRATION_REGIMES for h in HEAD_CE for s in SEEDS]


def write_run(sweep_dir: Path, regime: str, seed: int, *, lam: float, schedule: str, base: float,
              wandb_runs: tuple[str, ...] = (), head_ce: float | None = None) -> Path:
    """One run dir; `head_ce` (not None: a calibration-sweep run) adds `regime.head_ce`, the MTP head's
    acceptance metrics and exact diagnostics at every occ step."""
    if head_ce is not None:
        name = f"{regime}_h{head_ce:g}_s{seed}"
    else:
        name = f"{regime}_s{seed}" if sweep_dir.name == "main" else f"{regime}_lam{lam}_{schedule}_s{seed}"
    run_dir = sweep_dir / name
    config = _config(name, sweep_dir, regime, seed, lam, schedule)
    if head_ce is not None:
        config["regime"]["head_ce"] = head_ce
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).config.write_text(yaml.safe_dump(config, sort_keys=False))
    RunDir(run_dir).overrides.write_text(f"regime={regime}\nseed={seed}\nregime.lam={lam}\n")
    update_run_json(run_dir, name=name, host="testhost", git_commit="0" * 40, start_time="2026-01-01",
                    end_time=None, world_size=1, slurm_job_id=None, status="running", wandb_id=None)
    mode = "offline" if name in wandb_runs else "disabled"
    logger = RunLogger(run_dir, config=config, name=name, mode=mode, group=sweep_dir.name)
    for step in range(1, STEPS + 1):
        metrics = _step_metrics(regime, seed, step, every_step_diag=head_ce is not None)
        if head_ce is not None:
            metrics |= {"mtp/accept": mtp_accept(head_ce, step),
                        "mtp/lambda": metrics.get("occ/lambda", lam)}
        logger.log(metrics, step=step)
        if step in EVAL_STEPS:
            summary = _summary(base - 0.05 * (step != STEPS), seed, step)
            if head_ce is not None:
                summary["extra"] = {"mtp_accept": HELD_OUT_ACCEPT + head_ce}
            samples = _write_eval(run_dir, summary, final=step == STEPS)
            logger.log(flat_metrics(summary), step=step, samples_path=samples)  # a line of its own, same step
    logger.finish("finished")
    update_run_json(run_dir, status="finished", end_time="2026-01-01T01:00:00")
    return run_dir


def _config(name: str, sweep_dir: Path, regime: str, seed: int, lam: float, schedule: str) -> dict:
    regime_cfg = {"name": regime, "lam": lam,
                  "grad_path": {"embedding": regime != "detach", "backbone": regime != "detach",
                                "lm_head": regime != "detach"}}
    if regime == "occ":
        regime_cfg |= {"lambda_plus": 1.0, "eps": 1e-8, "estimator": "ratio_of_sums", "masked": True}
    return {"name": name, "run_root": str(sweep_dir), "seed": seed, "steps": STEPS,
            "model": {"name": "tiny"}, "regime": regime_cfg, "coef_schedule": {"name": schedule},
            "algo": {"name": "tiny"}, "diagnostics": {"every": 5 if regime == "occ" else 0}}


def _step_metrics(regime: str, seed: int, step: int, every_step_diag: bool = False) -> dict[str, float]:
    diag = regime == "occ" and (every_step_diag or step in DIAG_STEPS)
    out = {"reward/mean": reward(regime, seed, step), "loss/pg": 0.01 * step, "loss/mtp": 1.0 / step,
           "mtp/ce": 2.0 / step, "mtp/clipfrac": 0.01,
           "time/step_s": DIAG_TIME if diag else STEP_TIME[regime], "time/rollout_s": 5.0,
           "time/update_s": 3.0}
    out |= occ_metrics(seed, step, diag) if regime == "occ" else {}
    if every_step_diag and diag and step > 1:  # the previous update's g_RL: none at the first step
        out["diag/c_cross"] = c_cross(seed, step)
    return out


def c_cross(seed: int, step: int) -> float:
    """`diag/c_cross` of a calibration-sweep occ run: −(the proxy ĉ), so r(c_cross, ĉ) = −1, no sign agreement."""
    return -occ_metrics(seed, step, False)["occ/c_hat"]


def _summary(base: float, seed: int, step: int) -> dict:
    benches = {}
    for i, b in enumerate(BENCHMARKS):
        avg = eval_value(base, seed, i)
        benches[b] = {"n": 30, "k": 4, "avg": avg, "avg_ci": [avg - 0.03, avg + 0.03],
                      "pass": avg + 0.1, "pass_ci": [avg + 0.05, avg + 0.15], "maj": avg + 0.02,
                      "maj_ci": [avg - 0.01, avg + 0.05], "timeouts": 0}
    mean = {s: sum(v[s] for v in benches.values()) / len(benches) for s in ("avg", "pass", "maj")}
    settings = {"template": "boxed", "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "k": 4,
                "grader": "math_verify", "timeout_s": 1.0, "seed": 0, "limit": None}
    return {"step": step, "settings": settings, "benchmarks": benches, "average": mean}


def _write_eval(run_dir: Path, summary: dict, final: bool) -> Path:
    """Final summary.json and samples.jsonl (a mid-run eval only writes its samples to a side file)."""
    evals = RunDir(run_dir).eval
    evals.root.mkdir(exist_ok=True)
    if final:
        evals.summary.write_text(json.dumps(summary, indent=2))
    samples = evals.samples if final else evals.root / f"samples_step{summary['step']}.jsonl"
    with open(samples, "w") as f:
        for b in BENCHMARKS:
            for sample in range(2):
                f.write(json.dumps({"benchmark": b, "id": f"{b}-0", "sample": sample, "prompt": "1+1=",
                                    "completion": "\\boxed{2}", "answer": "2", "extracted": "2",
                                    "score": 1.0, "timeout": False}) + "\n")
    return samples


def isolate_wandb(monkeypatch, tmp_path: Path) -> None:
    """Keep wandb off the network and out of $HOME: no login, a loopback server that refuses
    connections, and its cache/config/data dirs under `tmp_path`."""
    for var in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID",
                "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # loopback discard port: refused at once
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_home" / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_home" / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_home" / "data"))
    monkeypatch.setenv("NETRC", str(tmp_path / "wandb_home" / "netrc"))  # no stored login


def reset_wandb() -> None:
    """Forget wandb's in-process state (its service, settings and any API key read from the
    environment), so that one test's login does not leak into the next."""
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
