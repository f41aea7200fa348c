"""SLURM through submitit, on a real one-node cluster; and fast unit tests of `mtp_occ.preempt`.

The `slurm` tests submit real jobs through sbatch with `hydra/launcher=slurm_local` (CI starts the
cluster with `bash slurm/local_cluster.sh start`; without one they skip, with the reason shown):
  - the four-regime sweep finishes four complete run dirs;
  - a job signalled mid-run (SIGUSR2, what SLURM sends before a time limit) checkpoints, is requeued by
    submitit, resumes, and ends with the metrics of an uninterrupted job of the same config;
  - a bad config fails on the submitting side and queues nothing;
  - a 2-task job equals torchrun's 2 processes and resumes after a requeue to the same metrics;
  - the paper preset's CPU rehearsal (`experiment=rehearsal`) as one 2-task job survives a requeue (also
    marked `vllm`).
Every job is named after its test (`hydra.launcher.name`) so that teardown can cancel leftovers.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TINY

from mtp_occ.preempt import (
    PORT_BASE,
    Preempted,
    PreemptionGuard,
    dist_env_from_slurm,
    first_host,
    shield_children,
    slurm_job_id,
)

REPO = Path(__file__).resolve().parent.parent
REGIMES = ("detach", "ce", "policy", "occ")
JOB_ARGS = [*TINY, "threads=1"]  # one CPU per job (slurm_local): two jobs share the 2 cores


@pytest.fixture(autouse=True)
def _outside_any_slurm_job(monkeypatch):
    """Tests start outside SLURM even when pytest itself runs inside an allocation."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)


# ------------------------------------------------------------------------------- unit: SLURM env
TASK_ENV = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[003-005,010],cpu1"}


def test_dist_env_from_slurm_derives_torch_distributed_variables():
    env = dist_env_from_slurm(TASK_ENV)
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                   "MASTER_PORT": str(PORT_BASE + 4242)}
    other_task = dist_env_from_slurm({**TASK_ENV, "SLURM_PROCID": "4", "SLURM_LOCALID": "0"})
    assert (other_task["MASTER_ADDR"], other_task["MASTER_PORT"]) == (env["MASTER_ADDR"], env["MASTER_PORT"])


def test_dist_env_from_slurm_keeps_an_explicit_rendezvous():
    env = dist_env_from_slurm({**TASK_ENV, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.7", "29500")


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set"),
    ({"SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
    ({"SLURM_PROCID": "8"}, "outside [0, SLURM_NTASKS=8)"),
    ({"SLURM_LOCALID": "6"}, "SLURM_LOCALID=6"),
    ({"SLURM_JOB_NODELIST": "gpu[1-2"}, "is not a SLURM hostlist"),
])
def test_dist_env_from_slurm_names_the_bad_variable(change, message):
    env = {k: v for k, v in {**TASK_ENV, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=re.escape(message)):
        dist_env_from_slurm(env)


@pytest.mark.parametrize("nodelist, host", [("vm", "vm"), ("node[01-04]", "node01"), ("a1,b[2-3]", "a1"),
                                            ("gpu[7,9]", "gpu7"), ("rack[2-3]-n[08-09]", "rack2-n08")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_slurm_job_id_names_an_array_task_unambiguously():
    assert slurm_job_id({"SLURM_JOB_ID": "17"}) == "17"
    assert slurm_job_id({"SLURM_JOB_ID": "17", "SLURM_ARRAY_JOB_ID": "17", "SLURM_ARRAY_TASK_ID": "1"}) == "17_1"
    assert slurm_job_id({}) is None


# -------------------------------------------------------------------------------------- unit: guard
def _run_dir(tmp_path: Path) -> Path:
    (tmp_path / "run.json").write_text(json.dumps({"name": "x", "status": "running"}))
    return tmp_path


def _signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary of the main thread


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM], ids=lambda s: s.name)
def test_guard_turns_a_signal_into_a_flag_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert not guard.requested
        _signal_self(sig)
        assert guard.requested and guard.signal == sig
    assert signal.getsignal(sig) == before


def test_exit_outside_slurm_marks_the_run_preempted(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    with PreemptionGuard() as guard:
        _signal_self(signal.SIGUSR1)
        with pytest.raises(Preempted) as stop:
            guard.exit_for_requeue(run_dir)
    assert isinstance(stop.value, SystemExit) and stop.value.code == 128 + signal.SIGUSR1
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "preempted" and run["name"] == "x"
    assert [p["signal"] for p in run["preemptions"]] == ["SIGUSR1"]
    assert "run the same command again to resume" in capsys.readouterr().err


class _FakeSubmititHandler:
    """Stands in for submitit's SignalHandler: same module prefix and method name."""
    __module__ = "submitit.core.job_environment"

    def __init__(self):
        self.calls = []

    def checkpoint_and_try_requeue(self, signum, frame=None):
        self.calls.append(signum)
        sys.exit(-1)  # what submitit does after `scontrol requeue`


def test_under_submitit_the_guard_hands_over_to_submitits_requeue(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    fake = _FakeSubmititHandler()
    previous = signal.signal(signal.SIGUSR2, fake.checkpoint_and_try_requeue)
    try:
        with PreemptionGuard() as guard:
            _signal_self(signal.SIGUSR2)
            assert fake.calls == [], "the guard must hold the signal until the checkpoint is written"
            with pytest.raises(Preempted) as stop:
                guard.exit_for_requeue(_run_dir(tmp_path))
        assert fake.calls == [signal.SIGUSR2] and stop.value.code == -1
        assert signal.getsignal(signal.SIGUSR2) == fake.checkpoint_and_try_requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert json.loads((tmp_path / "run.json").read_text())["preemptions"][0]["slurm_job_id"] == "77"


def test_plain_slurm_requeues_with_scontrol_but_not_on_sigterm(tmp_path, monkeypatch):
    import mtp_occ.preempt as preempt

    calls = []
    monkeypatch.setattr(preempt.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    for sig, expected in ((signal.SIGUSR1, [["scontrol", "requeue", "88"]]), (signal.SIGTERM, [])):
        calls.clear()
        with PreemptionGuard() as guard:
            _signal_self(sig)
            with pytest.raises(Preempted):
                guard.exit_for_requeue(_run_dir(tmp_path))
        assert calls == expected, sig


def test_children_started_in_shield_children_cannot_be_killed_by_preemption_signals():
    with PreemptionGuard() as guard:
        with shield_children():
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
            _signal_self(signal.SIGUSR2)
        time.sleep(0.01)
        assert guard.requested  # this process still gets the signal
    try:
        child.send_signal(signal.SIGUSR2)  # what SLURM does to every process of the step
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------- launch profiles
def test_basic_launcher_runs_a_multirun(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", "-m", "hydra/launcher=basic", f"run_root={tmp_path}",
                        "regime=detach,occ", "dry_run=true"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("run dir") == 2


# ------------------------------------------------------------------------------ the local cluster
def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on this machine"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 10 s"
    if not {"idle", "mixed", "allocated", "completing"} & set(p.stdout.split()):
        return f"no usable node (sinfo: {(p.stdout + p.stderr).strip()[:200] or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"local SLURM cluster not up: {problem}; start it with `bash slurm/local_cluster.sh start`")


@pytest.fixture
def job_name(cluster, request):
    """A name for this test's jobs; teardown cancels whatever is still queued under it."""
    name = f"mtpocc-{request.node.name[:40]}-{os.getpid()}".replace("[", "-").replace("]", "")
    yield name
    for _ in range(30):  # a finished sweep returns while its last job step is still closing: let it end
        if not _queued(name):
            return
        time.sleep(0.5)
    subprocess.run(["scancel", "--name", name], capture_output=True, timeout=30)


def _queued(name: str) -> dict[str, str]:
    """Raw job id -> array-form id (`<array>_<task>`) of the jobs queued or running under `name`."""
    p = subprocess.run(["squeue", "-h", "--name", name, "-o", "%A %i"], capture_output=True, text=True, timeout=30)
    return dict(line.split() for line in p.stdout.splitlines() if line.strip())


def _env() -> dict:
    # Jobs run with this environment (sbatch exports it): the venv's Python, the shared data dir, and
    # the session's MTP_OCC_CACHE (conftest), so every job of every test shares one pre-trained base.
    return {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _multirun(run_root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mtp_occ.run", "-m", "hydra/launcher=slurm_local", f"run_root={run_root}", *args]


def _sweep_command(run_root: Path, args: list[str]) -> list[str]:
    """`make sweep LAUNCHER=slurm_local` when the Makefile passes ARGS through, else its python command."""
    if "$(ARGS)" in (REPO / "Makefile").read_text():
        return ["make", "--no-print-directory", "sweep", "LAUNCHER=slurm_local", f"RUN_ROOT={run_root}",
                f"BIN={Path(sys.executable).parent}", "ARGS=" + " ".join(args)]
    return _multirun(run_root, "regime=" + ",".join(REGIMES), *args)


def _logs(run_root: Path, tail: int = 3000) -> str:
    texts = [f"--- {p}\n{p.read_text()[-tail:]}" for p in sorted(run_root.glob(".submitit/*/*_log.*"))]
    return "\n".join(texts) or "(no job logs)"


def _run_dirs(run_root: Path) -> dict[str, Path]:
    """Run dirs by the value of the `name`/`regime` override that distinguishes them."""
    out = {}
    for run in run_root.glob("*/run.json"):
        overrides = dict(o.split("=", 1) for o in (run.parent / "overrides.txt").read_text().split())
        out[overrides.get("name") or overrides["regime"]] = run.parent
    return out


def _metrics(run_dir: Path, strip_times: bool = False) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (strip_times and k.startswith("time/"))} for r in rows]


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_on_slurm_writes_four_complete_run_dirs(tmp_path, job_name):
    cmd = _sweep_command(tmp_path, [*JOB_ARGS, f"hydra.launcher.name={job_name}"])
    try:
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sweep did not finish in 600 s; squeue: {_queued(job_name)}\n{_logs(tmp_path)}")
    assert p.returncode == 0, f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}\n{_logs(tmp_path)}"
    runs = _run_dirs(tmp_path)
    assert sorted(runs) == sorted(REGIMES), list(tmp_path.iterdir())
    job_ids = set()
    for regime, d in runs.items():
        run = json.loads((d / "run.json").read_text())
        assert run["status"] == "finished", (regime, run)
        assert re.fullmatch(r"\d+(_\d+)?", str(run["slurm_job_id"])), (regime, run)  # ran under SLURM
        job_ids.add(run["slurm_job_id"])
        assert (d / "eval" / "summary.json").exists() and (d / "checkpoints" / "latest").exists()
        assert [r["step"] for r in _metrics(d)] == [1, 2]
    assert len(job_ids) == 4
    logs = sorted(tmp_path.glob(".submitit/*/*_log.out"))
    assert len(logs) == 4 and all("slurm/env.sh: job" in p.read_text() for p in logs)  # setup ran in each job


@pytest.mark.slurm
@pytest.mark.slow
def test_job_signalled_mid_run_requeues_and_matches_an_uninterrupted_one(tmp_path, job_name):
    steps = 20  # ~0.2 s each: enough time to signal between step 2 and the end
    args = [o for o in JOB_ARGS if not o.startswith("steps=")] + [f"steps={steps}", "regime=occ", "name=ref,victim",
                                                                  f"hydra.launcher.name={job_name}"]
    log = open(tmp_path / "submit.log", "w")
    p = subprocess.Popen(_multirun(tmp_path / "runs", *args), cwd=REPO, env=_env(), stdout=log,
                         stderr=subprocess.STDOUT, text=True)
    victim = tmp_path / "runs" / "victim"
    try:
        deadline = time.time() + 300
        while not ((victim / "metrics.jsonl").exists() and len(_metrics(victim)) >= 2):
            assert p.poll() is None and time.time() < deadline, (tmp_path / "submit.log").read_text()[-3000:]
            time.sleep(0.05)
        # the raw id of an array task can be the array's own id, which would signal both jobs
        recorded = json.loads((victim / "run.json").read_text())["slurm_job_id"]  # `<array>_<task>` form
        job = recorded if "_" in recorded else _queued(job_name)[recorded]
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # as at a time limit
        p.wait(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    out = (tmp_path / "submit.log").read_text()
    assert p.returncode == 0, out[-3000:] + _logs(tmp_path / "runs")
    run = json.loads((victim / "run.json").read_text())
    assert run["status"] == "finished"
    assert [(e["signal"], e["slurm_job_id"]) for e in run["preemptions"]] == [("SIGUSR2", job)]
    ref, got = _metrics(tmp_path / "runs" / "ref", True), _metrics(victim, True)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert got == ref
    ref_run = json.loads((tmp_path / "runs" / "ref" / "run.json").read_text())
    assert ref_run["status"] == "finished" and "preemptions" not in ref_run  # the signal reached one job only
    job_logs = _logs(tmp_path / "runs", tail=10**7)
    assert f"Requeued job {job}" in job_logs and "resumed from" in job_logs, job_logs  # submitit requeued, we resumed


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("bad, message", [
    (["regime=detach,ce,policy,occ", "algo.group_size=1"], "config key `algo.group_size`: must be >= 2"),
    (["regime=detach,nope"], "config group `regime`: unknown option 'nope'; valid: ce, detach"),
    (["regime=detach,ce", "name=same"], "same run dir"),
])
def test_bad_config_fails_before_anything_is_queued(tmp_path, job_name, bad, message):
    t0 = time.time()
    p = subprocess.run(_multirun(tmp_path, *JOB_ARGS, *bad, f"hydra.launcher.name={job_name}"), cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    assert "nothing was submitted" in p.stderr
    assert not (tmp_path / ".submitit").exists() and not _queued(job_name)
    assert time.time() - t0 < 60


def _torchrun_2(run_root: Path, args: list[str], timeout: int) -> None:
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29600 + os.getpid() % 200), "-m", "mtp_occ.run", *args, f"run_root={run_root}"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _two_task_job_signalled(tmp_path: Path, args: list[str], job_name: str, after_rows: int, mem_gb: int,
                            timeout: int) -> Path:
    """Run `args` as one 2-task SLURM job, send it USR2 (as before a time limit: every task gets it) once its
    metrics have `after_rows` rows, and wait for the requeued job to finish; the run dir."""
    log = open(tmp_path / "submit.log", "w")
    p = subprocess.Popen(_multirun(tmp_path / "runs", *args, f"hydra.launcher.name={job_name}",
                                   "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
                                   f"hydra.launcher.mem_gb={mem_gb}"),
                         cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    name = next(a.split("=", 1)[1] for a in args if a.startswith("name="))
    victim = tmp_path / "runs" / name
    try:
        deadline = time.time() + timeout
        while not ((victim / "metrics.jsonl").exists() and len(_metrics(victim)) >= after_rows):
            assert p.poll() is None and time.time() < deadline, (tmp_path / "submit.log").read_text()[-3000:]
            time.sleep(0.05)
        job = json.loads((victim / "run.json").read_text())["slurm_job_id"]
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
        log.close()
    assert p.returncode == 0, (tmp_path / "submit.log").read_text()[-3000:] + _logs(tmp_path / "runs")
    run = json.loads((victim / "run.json").read_text())
    assert run["status"] == "finished" and run["world_size"] == 2
    assert [e["signal"] for e in run["preemptions"]] == ["SIGUSR2"]
    assert "resumed from" in _logs(tmp_path / "runs", tail=10**7)
    return victim


@pytest.mark.slurm
@pytest.mark.slow
def test_a_two_task_job_equals_torchrun_and_resumes_after_a_requeue(tmp_path, job_name):
    """One SLURM job of 2 tasks (`hydra.launcher.tasks_per_node=2`: the ranks come from SLURM's variables,
    `preempt.dist_env_from_slurm`) computes what `torchrun --nproc_per_node 2` does, and a USR2 mid-run (as
    before a time limit) checkpoints on both ranks, requeues the job once, and resumes to the same metrics."""
    steps = 12
    args = [o for o in JOB_ARGS if not o.startswith("steps=")] + [f"steps={steps}", "regime=occ", "eval.enabled=false",
                                                                  "name=dp2"]
    _torchrun_2(tmp_path / "ref", args, timeout=600)
    victim = _two_task_job_signalled(tmp_path, args, job_name, after_rows=2, mem_gb=2, timeout=600)
    got, want = _metrics(victim, True), _metrics(tmp_path / "ref" / "dp2", True)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert got == want


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.vllm
def test_the_paper_preset_rehearsal_survives_a_requeue_as_one_two_task_job(tmp_path, job_name):
    """`experiment=rehearsal` (the paper preset with only its sizes shrunk: SmolLM2-135M from its GGUF file,
    DAPO-Math-17k + the dapo grader, packing + a token budget, ZeRO-3, vLLM's CPU build, math6 evaluation)
    as one 2-task SLURM job, signalled with USR2 after its first step: it requeues, resumes, and ends with
    the metrics (evaluation included) of an uninterrupted `torchrun --nproc_per_node 2` run."""
    args = ["experiment=rehearsal", "name=rh"]
    t0 = time.time()
    _torchrun_2(tmp_path / "ref", args, timeout=900)
    print(f"rehearsal, uninterrupted (torchrun): {time.time() - t0:.0f} s")
    t0 = time.time()
    victim = _two_task_job_signalled(tmp_path, args, job_name, after_rows=1, mem_gb=8, timeout=900)
    print(f"rehearsal, one 2-task SLURM job with a requeue: {time.time() - t0:.0f} s")
    got, want = _metrics(victim, True), _metrics(tmp_path / "ref" / "rh", True)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got == want
    assert all(r["rollout/logprob_mismatch"] < 1e-3 and r["rollout/probe_mismatch"] < 1e-3 for r in got)
    assert any(k.startswith("eval/") for k in got[-1]), sorted(got[-1])  # the final evaluation is in the compared rows
    assert (victim / "eval" / "summary.json").exists() and (victim / "eval" / "base" / "summary.json").exists()
