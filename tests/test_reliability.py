"""Reliability: kill at any point and lose nothing; every bad input gets a clear, early error.

One test (or table) per row of docs/what_happens_when.md:
  1. SIGKILL at >= 10 seeded random moments (some inside a checkpoint write) -> every restart resumes from
     the last complete checkpoint and the final metrics equal an uninterrupted run's (CPU, `time/*` aside).
  2. NaN in the MTP loss / policy loss -> the update is skipped and counted, or the run stops naming the
     step and the term; `checkpoint.save` refuses non-finite weights.
  3. Bad configuration -> one line naming the key and the valid choices, exit code 2, before any model.
  4. Bad training data -> file:line and the field, before the run dir or the model exists.
  5. wandb unreachable / not logged in -> offline, said once, the run finishes.
  6. A hostile completion -> its grading times out, `reward/timeouts` counts it, training goes on.

The tiny task of tests/test_train.py (TINY) with evaluation off keeps each run to a few seconds on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from test_train import TINY

from mtp_occ import checkpoint, log
from mtp_occ import run as cli
from mtp_occ.config import ConfigError, compose
from mtp_occ.eval.benchmarks import BenchmarkDataError
from mtp_occ.rollout.vllm import installed_vllm, is_cpu_build
from mtp_occ.train import train

REPO = Path(__file__).resolve().parent.parent
BASE = [o for o in TINY if not o.startswith(("steps=", "wandb.mode="))] + ["eval.enabled=false"]
CUDA = torch.cuda.is_available()
# with vLLM's CPU build installed, rollout=vllm (the CUDA preset) runs on CPU once its KV cache is sized
VLLM_KEY = "rollout.kv_cache_mib" if is_cpu_build(installed_vllm()) else "rollout.backend"


def _train(tmp_path: Path, *extra: str) -> tuple[Path, dict]:
    wandb = [] if any(o.startswith("wandb.mode=") for o in extra) else ["wandb.mode=disabled"]
    cfg = compose([*BASE, *wandb, f"run_root={tmp_path}", *extra])
    return cfg.run_dir, train(cfg, list(extra))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _no_model(monkeypatch) -> None:
    """Make building a model or a run dir an error: what fails must fail before either."""
    def refuse(*a, **k):
        raise AssertionError("got as far as building the run dir / the model")

    monkeypatch.setattr("mtp_occ.train.build_policy", refuse)
    monkeypatch.setattr("mtp_occ.train.prepare_run_dir", refuse)


def _cli_env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


# ------------------------------------------------------------------------------ 1. crash consistency
STEPS = 8


def _strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _launch(run_root: Path, log_path: Path) -> subprocess.Popen:
    args = [*BASE, "wandb.mode=disabled", "regime=occ", f"steps={STEPS}", "save_every=1", "keep_checkpoints=2",
            "name=crash", f"run_root={run_root}"]
    with open(log_path, "w") as out:  # niced, so that the poller below sees short checkpoint windows
        return subprocess.Popen([sys.executable, "-m", "mtp_occ.run", *args], cwd=REPO, env=_cli_env(),
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(5))


def _latest_step(ckpt_root: Path) -> int:
    last = checkpoint.latest(ckpt_root)
    return 0 if last is None else int(last.name.removeprefix("step_"))


def _new_tmp(ckpt_root: Path, since_ns: int) -> bool:
    """A `*.tmp-*` entry (a checkpoint being written) created after `since_ns`; older ones are leftovers of
    an earlier kill, which the next save cleans up."""
    try:
        with os.scandir(ckpt_root) as it:
            return any(".tmp-" in e.name and e.stat(follow_symlinks=False).st_mtime_ns >= since_ns for e in it)
    except FileNotFoundError:
        return False


def _kill_at(p: subprocess.Popen, ckpt_root: Path, mode: str, rng: random.Random, t_first: float,
             step_s: float) -> bool:
    """SIGKILL `p` at a point chosen by `mode`; False if it exited first.
    startup:    after a random fraction of the time the reference took to complete its first checkpoint
                (imports, model load, resume, one step), or inside this attempt's first checkpoint write if
                that comes first.
    step:       a random moment within the step after this attempt's first complete checkpoint, or inside
                the next checkpoint write if that comes first.
    checkpoint: inside this attempt's first checkpoint write (a new `*.tmp-*` entry exists).
    So an attempt completes at most one checkpoint (`step`) or none, whatever the machine's speed, and
    enough steps are left for every later kill."""
    start_ns, start, base = time.time_ns(), time.monotonic(), _latest_step(ckpt_root)
    deadline = start + rng.uniform(0.1, 0.9) * t_first if mode == "startup" else None
    allowed = 1 if mode == "step" else 0  # checkpoints this attempt may complete
    while p.poll() is None:
        progress = _latest_step(ckpt_root) - base
        if progress > allowed:  # the poller missed a whole checkpoint write: stop here all the same
            break
        if progress == allowed and _new_tmp(ckpt_root, start_ns):
            break
        if mode == "step" and deadline is None and progress == 1:
            deadline = time.monotonic() + rng.uniform(0.05, 0.9) * step_s
        if deadline is not None and time.monotonic() >= deadline:
            break
        time.sleep(0.0005)
    if p.poll() is not None:
        return False
    p.send_signal(signal.SIGKILL)
    p.wait()
    return True


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_to_identical_metrics(tmp_path):
    from mtp_occ.tasks.pretrain import cached_base

    cfg = compose(BASE)
    cached_base(cfg.model, cfg.data, cfg.seed)  # pre-train the base now (if not cached) so the timings are a run's
    # the uninterrupted reference, timed to place the kills
    ref_root, ckpt_root = tmp_path / "ref", tmp_path / "killed" / "crash" / "checkpoints"
    p = _launch(ref_root, tmp_path / "ref.log")
    start, done_at, ref_ckpts = time.monotonic(), {}, ref_root / "crash" / "checkpoints"
    while p.poll() is None:  # when each checkpoint completes
        done_at.setdefault(_latest_step(ref_ckpts), time.monotonic() - start)
        time.sleep(0.002)
    assert p.returncode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    reference = _rows(ref_root / "crash")
    t_first = done_at.get(1, 5.0)  # launch -> first checkpoint: imports, model load, one step
    step_s = max(0.01, (max(done_at.values()) - t_first) / (STEPS - 1))

    rng = random.Random(0)
    plan = ["checkpoint"] * 4 + ["step"] * 3 + ["startup"] * 4
    rng.shuffle(plan)
    kills, torn, expected, attempt_logs = [], 0, [], []
    for i, mode in enumerate(plan):
        before = _latest_step(ckpt_root)
        if mode == "step" and STEPS - before <= 3:  # keep enough steps left for every later kill
            mode = "checkpoint"
        expected.append(checkpoint.latest(ckpt_root))
        attempt_logs.append(tmp_path / f"attempt{i}.log")
        start_ns = time.time_ns()
        p = _launch(tmp_path / "killed", attempt_logs[-1])
        killed = _kill_at(p, ckpt_root, mode, rng, t_first, step_s)
        assert killed, f"attempt {i} ({mode}) finished before it could be killed: {kills}\n" \
                       f"{attempt_logs[-1].read_text()[-2000:]}"
        in_ckpt = _new_tmp(ckpt_root, start_ns)  # this attempt left a torn checkpoint behind
        torn += in_ckpt
        kills.append((mode, before, _latest_step(ckpt_root), in_ckpt))
        # what survives a kill is always a complete, loadable checkpoint (or none)
        last = checkpoint.latest(ckpt_root)
        if last is not None:
            state = torch.load(last / "state.pt", map_location="cpu", weights_only=False)
            assert state["step"] == int(last.name.removeprefix("step_"))

    # shown with -s, and on failure
    print(f"first checkpoint after {t_first:.2f} s, {step_s:.2f} s/step; kills (mode, checkpoint before, after, "
          f"torn checkpoint left): {kills}")
    # the final attempt runs to the end
    expected.append(checkpoint.latest(ckpt_root))
    attempt_logs.append(tmp_path / "final.log")
    p = _launch(tmp_path / "killed", attempt_logs[-1])
    assert p.wait(timeout=600) == 0, attempt_logs[-1].read_text()[-3000:]

    # every attempt that got as far as loading resumed from the checkpoint the previous kill left behind
    for log_path, ckpt in zip(attempt_logs, expected, strict=True):
        resumed = re.findall(r"resumed from (\S+) \(step (\d+)\)", log_path.read_text())
        if ckpt is None:
            assert not resumed, log_path.read_text()[-2000:]
        elif log_path.name == "final.log" or resumed:
            assert resumed == [(str(ckpt), ckpt.name.removeprefix("step_").lstrip("0"))], log_path.read_text()[-2000:]

    assert len(kills) >= 10 and {k[0] for k in kills} == {"startup", "step", "checkpoint"}, kills
    assert torn >= 1, f"no kill landed inside a checkpoint write: {kills}"
    lines = (tmp_path / "killed" / "crash" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # no torn line: every line parses
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), kills  # no step missing or twice
    assert _strip_times(rows) == _strip_times(reference)
    assert checkpoint.latest(ckpt_root).name == f"step_{STEPS:06d}"
    assert not [e for e in ckpt_root.iterdir() if ".tmp-" in e.name], "a torn checkpoint was left behind"


# ------------------------------------------------------------------------------- 2. numerical faults
def _nan_mtp_loss(monkeypatch, bad_calls):
    """Make the OCC regime's MTP loss NaN on the listed calls (1-based; one call per optimizer update)."""
    from mtp_occ.regimes.occ import OccRegime

    real, calls = OccRegime.mtp_term, []

    def mtp_term(self, x):
        term = real(self, x)
        calls.append(1)
        return dataclasses.replace(term, loss=term.loss * float("nan")) if bad_calls(len(calls)) else term

    monkeypatch.setattr(OccRegime, "mtp_term", mtp_term)


def _nan_policy_loss(monkeypatch):
    import mtp_occ.update

    real = mtp_occ.update.policy_loss

    def policy_loss(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("nan"), m

    monkeypatch.setattr(mtp_occ.update, "policy_loss", policy_loss)


def _inf_gradient(monkeypatch):
    """A finite loss whose gradient is not: the embedding's gradient is set to inf before clipping."""
    import mtp_occ.engine

    real = mtp_occ.engine.clip_grads

    def clip_grads(model, max_norm):
        model.lm.get_input_embeddings().weight.grad.fill_(float("inf"))
        return real(model, max_norm)

    monkeypatch.setattr(mtp_occ.engine, "clip_grads", clip_grads)


def _all_finite(ckpt_dir: Path) -> bool:
    weights = checkpoint.model_weights(ckpt_dir)
    return all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_one_nan_update_is_skipped_counted_and_the_run_finishes(tmp_path, monkeypatch):
    _nan_mtp_loss(monkeypatch, lambda n: n == 3)  # step 2, first of its 2 updates
    run_dir, _ = _train(tmp_path, "regime=occ", "steps=3", "name=nan_once")
    rows = _rows(run_dir)
    assert [r["fault/skipped_updates"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["fault/skipped_total"] for r in rows] == [0.0, 1.0, 1.0]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    done = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    assert done and all(_all_finite(c) for c in done)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no update ran
@pytest.mark.parametrize("term", ["mtp", "pg", "gradient"])
def test_repeated_nans_stop_the_run_naming_the_step_and_the_term(tmp_path, monkeypatch, term):
    {"mtp": lambda: _nan_mtp_loss(monkeypatch, lambda n: True), "pg": lambda: _nan_policy_loss(monkeypatch),
     "gradient": lambda: _inf_gradient(monkeypatch)}[term]()
    with pytest.raises(FloatingPointError, match=rf"^step 2: .* non-finite {term} term"):
        _train(tmp_path, "regime=occ", "steps=4", "algo.max_bad_steps=2", f"name=nan_{term}")
    run_dir = tmp_path / f"nan_{term}"
    assert [(r["step"], r["fault/skipped_updates"]) for r in _rows(run_dir)] == [(1, 2.0)]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    last = checkpoint.latest(run_dir / "checkpoints")
    assert last.name == "step_000001" and _all_finite(last)  # skipped updates left the weights finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_save_refuses_non_finite_weights(tmp_path, bad):
    state = {"engine": {"model": {"ok": torch.ones(3), "w": torch.tensor([1.0, bad])}}, "step_extra": 0}
    with pytest.raises(FloatingPointError, match=r"refusing to checkpoint step 3: non-finite values in \['w'\]"):
        checkpoint.save(tmp_path, 3, state)
    assert checkpoint.latest(tmp_path) is None and not list(tmp_path.glob("step_*"))


def test_a_full_disk_during_a_checkpoint_names_the_dir_and_what_is_intact(tmp_path, monkeypatch):
    """ENOSPC while `state.pt` is written: the error names the checkpoint dir, the last complete checkpoint
    (untouched, still `latest`) and what to do; nothing torn is left behind."""
    import errno

    state = {"engine": {"model": {"w": torch.ones(3)}}}
    first = checkpoint.save(tmp_path, 1, state)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(checkpoint.CheckpointWriteError) as info:
        checkpoint.save(tmp_path, 2, state)
    msg = str(info.value)
    assert f"could not write the checkpoint of step 2 under {tmp_path}: No space left on device" in msg
    assert f"the last complete checkpoint, {first}" in msg and "same command resumes from it" in msg
    assert info.value.errno == errno.ENOSPC
    assert checkpoint.latest(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["latest", first.name])  # no torn temp dir


# ---------------------------------------------------------------------------- 3. bad configuration
def _message(e: BaseException) -> str:
    """What the CLI prints for this error (mtp_occ.run)."""
    return str(e) if isinstance(e, ConfigError) else cli._one_line(e)


# (overrides, the key the message must name, a hint of the valid choices / range)
COMPOSE_CASES = [
    (["regime=nope"], "regime", "occ_compat"),  # unknown group option
    (["model=gpt5"], "model", "smollm2_135m"),
    (["coef_schedule=nope"], "coef_schedule", "warmup_then_constant"),
    (["algo.nope=1"], "algo.nope", "group_size"),  # unknown key
    (["+algo.nope=1"], "algo.nope", "group_size"),  # ... also when appended with +
    (["+nope=1"], "nope", "run_root"),
    (["algo.group_size=abc"], "algo.group_size", "Integer"),  # wrong type
    (["regime.lambda_plus=abc"], "regime.lambda_plus", "Float"),
    (["wandb.mode=maybe"], "wandb.mode", "offline"),
    (["algo.group_size=1"], "algo.group_size", ">= 2"),
    (["algo.updates_per_step=3"], "algo.updates_per_step", "divide"),  # 3 does not divide 64 prompts
    (["algo.max_bad_steps=0"], "algo.max_bad_steps", ">= 1"),
    (["deepspeed.stage=4"], "deepspeed.stage", "0, 1, 2 or 3"),
    (["coef_schedule=warmup_then_constant", "coef_schedule.warmup_frac=1.5"], "coef_schedule.warmup_frac", "[0, 1]"),
    (["coef_schedule=step", "coef_schedule.milestones=[0.5,2]"], "coef_schedule.milestones", "[0, 1]"),
    (["coef_schedule.start=-1"], "coef_schedule.start/end", ">= 0"),
    (["regime=ce", "regime.lam=-1"], "regime.lam", ">= 0"),
    (["regime.ema=1"], "regime.ema", "[0, 1)"),
    (["eval.k=0"], "eval.k", ">= 1"),
    (["eval.temperature=0"], "eval.k", "k=1"),
    (["data.source=jsonl"], "data.path", "file path"),  # conflicting paths
    (["data=dapo_math_17k"], "eval.benchmarks", "data=arith"),
    (["data=dapo_math_17k", "eval=math6"], "data.source", "model=smollm2_135m"),  # tiny needs a task's tokenizer
    (["data.source=nope"], "data.source", "arith, jsonl, hub"),
    (["deepspeed=zero2", "diagnostics.every=2"], "diagnostics.every", "deepspeed=none"),
    (["algo.pack_sequences=true", "model.attn_implementation=paged"], "algo.pack_sequences", "sdpa"),
    (["algo.max_tokens_per_micro_batch=50"], "algo.max_tokens_per_micro_batch", "at least 80"),
    (["regime=occ", "+regime.lam=5"], "regime.lam", "lambda_plus"),  # occ's coefficient is λ₊
    (["regime.head_ce=-1"], "regime.head_ce", ">= 0"),
    (["regime=occ_exact", "deepspeed=zero2"], "regime", "deepspeed=none"),
    (["regime=occ_exact", "diagnostics.every=2"], "diagnostics.every", "occ/c"),
    (["eval.benchmarks=[aime24,aime26]"], "eval.benchmarks", "olympiadbench"),
    (["reward.grader=gpt_judge"], "reward.grader", "math_verify"),
    (["data.template=chatml"], "data.template", "qwen_boxed"),
    (["rollout.top_p=0"], "rollout.top_p", "(0, 1]"),
    (["algo.agg=mean"], "algo.agg", "token-mean"),
    (["model.dtype=fp8"], "model.dtype", "bfloat16"),
    (["model=smollm2_135m", "model.name_or_path="], "model.name_or_path", "hub id"),
    (["device=tpu"], "device", "cuda"),
    (["name=a/b"], "name", "without '/'"),
]


@pytest.mark.parametrize("overrides, key, hint", COMPOSE_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_config_is_one_line_naming_the_key(overrides, key, hint):
    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as info:
        compose(overrides)
    msg = _message(info.value)
    assert "\n" not in msg and f"`{key}`" in msg and hint in msg, msg


# settings this machine cannot run: refused at the top of train(), before the run dir and the model
ENV_CASES = [
    pytest.param(["rollout=vllm"], VLLM_KEY, "hf", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
    pytest.param(["device=cuda"], "device", "cpu", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
    (["deepspeed=zero2", "diagnostics.every=5"], "diagnostics.every", "deepspeed=none"),
]


@pytest.mark.parametrize("overrides, key, hint", ENV_CASES)
def test_settings_this_machine_cannot_run_fail_before_any_model(tmp_path, monkeypatch, overrides, key, hint):
    _no_model(monkeypatch)
    with pytest.raises(ConfigError, match=re.escape(f"`{key}`")) as info:
        _train(tmp_path, *overrides)
    assert hint in str(info.value)
    assert not any(tmp_path.iterdir())


def _bad_jsonl(tmp_path: Path) -> Path:
    p = tmp_path / "train.jsonl"
    p.write_text('{"id": "a", "problem": "1+1", "answer": "2"}\n{"id": "b", "problem": \n')
    return p


CLI_CASES = [
    (["regime=nope"], "regime", "occ_compat"),
    (["algo.nope=1"], "algo.nope", "group_size"),
    (["algo.group_size=abc"], "algo.group_size", "Integer"),
    (["algo.updates_per_step=3"], "algo.updates_per_step", "divide"),
    pytest.param(["rollout=vllm"], VLLM_KEY, "hf", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
    (["data.source=jsonl", "data.path={bad}", "model=smollm2_135m"], "{bad}:2", "malformed JSON"),
]


@pytest.mark.parametrize("overrides, key, hint", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_cli_reports_one_line_and_exit_code_2_before_building_anything(tmp_path, overrides, key, hint):
    """Early = before a run dir is written or a model built or loaded (checked by what the process printed and
    left behind, not by a clock: wall time on a shared machine says nothing)."""
    bad = _bad_jsonl(tmp_path)
    overrides = [o.format(bad=bad) for o in overrides]
    key = key.format(bad=bad)
    done = subprocess.run([sys.executable, "-m", "mtp_occ.run", *overrides, "eval.enabled=false", "steps=1",
                           f"run_root={tmp_path / 'runs'}", "dry_run=false"], cwd=REPO, env=_cli_env(),
                          capture_output=True, text=True, timeout=120)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0] and hint in err[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "pre-train" not in done.stdout + done.stderr and "loaded" not in done.stdout + done.stderr  # no model
    assert not list((tmp_path / "runs").glob("*/checkpoints")) and not list((tmp_path / "runs").glob("*/run.json"))


# ------------------------------------------------------------------------------------- 4. bad data
GOOD = '{"id": "a", "problem": "What is 1+1?", "answer": "2"}'
BAD_DATA = {
    "malformed_json": ([GOOD, '{"id": "b", "problem": "2+2", "answer": "4"'], 2, "malformed JSON"),
    "missing_field": ([GOOD, '{"id": "b", "problem": "2+2"}'], 2, "field 'answer' is missing"),
    "empty_problem": ([GOOD, '{"id": "b", "problem": "  ", "answer": "4"}'], 2, "field 'problem' is empty"),
    "non_string_answer": (['{"id": "a", "problem": "2+2", "answer": 4}'], 1, "field 'answer' must be a string"),
    "duplicate_id": ([GOOD, GOOD.replace("1+1", "3+3")], 2, "field 'id' 'a' repeats"),
    "not_an_object": ([GOOD, '["b", "2+2", "4"]'], 2, "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_training_data_names_file_line_and_field_before_any_model(tmp_path, monkeypatch, case):
    lines, lineno, needle = BAD_DATA[case]
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    _no_model(monkeypatch)
    with pytest.raises(BenchmarkDataError) as info:
        _train(tmp_path / "runs", "data.source=jsonl", f"data.path={path}", "model=smollm2_135m")
    assert str(info.value).startswith(f"{path}:{lineno}: ") and needle in str(info.value), str(info.value)
    assert not any("site-packages" in str(entry.path) for entry in info.traceback), "raised from a library"


def test_missing_training_file_names_the_key(tmp_path, monkeypatch):
    _no_model(monkeypatch)
    with pytest.raises(ConfigError, match=r"`data\.path`: .*nowhere\.jsonl is not a file"):
        _train(tmp_path, "data.source=jsonl", f"data.path={tmp_path / 'nowhere.jsonl'}", "model=smollm2_135m")


# ---------------------------------------------------------------------------- 5. external services
def test_unreachable_wandb_goes_offline_says_so_once_and_the_run_finishes(tmp_path, monkeypatch):
    from fixtures_runs import isolate_wandb, reset_wandb

    isolate_wandb(monkeypatch, tmp_path)  # no API key, WANDB_BASE_URL=http://127.0.0.1:9 (refused)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(log, "_warned_offline", False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_dir, _ = _train(tmp_path / "runs", "steps=1", "wandb.mode=online", "name=wb")
    finally:
        reset_wandb()
    said = [str(w.message) for w in caught if issubclass(w.category, log.WandbFallbackWarning)]
    assert len(said) == 1 and "offline" in said[0], said
    assert [r["step"] for r in _rows(run_dir)] == [1]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


# ------------------------------------------------------------------------ 6. untrusted model output
HOSTILE = "so the answer is \\boxed{9^{9^{9^{9}}}}"


def test_a_hostile_completion_times_out_and_training_goes_on(tmp_path, monkeypatch):
    import mtp_occ.rewards as rewards

    real = rewards.grade

    def grade(completions, answers, **kw):  # the first rollout of every batch is hostile
        return real([HOSTILE, *list(completions)[1:]], answers, **kw)

    monkeypatch.setattr(rewards, "grade", grade)
    start = time.monotonic()
    run_dir, _ = _train(tmp_path, "steps=2", "reward=math_verify", "reward.workers=1", "reward.timeout_s=0.5",
                        "name=hostile")
    assert time.monotonic() - start < 60
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["reward/timeouts"] >= 1 and r["reward/graded"] == 32 for r in rows), rows
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
