"""Preemption and requeue on SLURM: stop at a step boundary, checkpoint, requeue, resume from the run dir.

    with PreemptionGuard() as guard:              # SIGUSR1 / SIGUSR2 / SIGTERM only set a flag
        for step in ...:
            ...                                    # the step runs to its end, untouched
            stop = max_int(guard.requested)        # ranks agree: one signalled rank stops them all
            if stop or <save_every>:
                checkpoint.save(...)               # our checkpoint first,
            if stop:
                guard.exit_for_requeue(run_dir)    # then requeue (under SLURM) and raise Preempted

The usual submitit way is the other way round: submitit's signal handler interrupts the job wherever it
is and calls the callable's `checkpoint()`, which must capture the state right there. Ours cannot: a
model's state is only consistent between steps. So the guard replaces the handlers for the duration of
the loop, the loop finishes its step and saves, and only then `exit_for_requeue` hands over to
submitit's own handler, which we saved and call directly. The whole chain on a timeout or preemption
of a `hydra/launcher=slurm*` job:

  1. SLURM sends SIGUSR2 (`--signal=USR2@<signal_delay_s>` before the time limit, or a user's
     `scancel --signal=USR2 JOBID`) to the job step; the guard records it and the step goes on.
  2. The loop checkpoints that step (atomically, `mtp_occ.checkpoint`) and calls `exit_for_requeue`.
  3. run.json gets status "preempted" (and the signal, appended to `preemptions`).
  4. submitit's `checkpoint_and_try_requeue` calls the launcher's `checkpoint()`; Hydra's plugin returns
     a `DelayedSubmission` of the *same* arguments (same overrides), submitit pickles it, counts the
     timeout against `max_num_timeout` (a preemption costs nothing), runs `scontrol requeue`, exits.
  5. SLURM starts the job again once the credential expires; the same overrides give the same run name,
     hence the same run dir, and `train()` resumes from its last checkpoint (DESIGN §4: resume must
     come from a stable run dir, never a fresh timestamped one).

Without submitit (a plain `sbatch` script) SIGUSR1/SIGUSR2 requeue through `scontrol requeue
$SLURM_JOB_ID`. SIGTERM never requeues: SLURM sends it when it ends the job itself (scancel, time limit,
its own preemption), so the guard only saves what the grace time allows and exits. Outside SLURM every
signal ends the run with status "preempted", exit code 128+signal and a message saying how to resume.

Also here: `dist_env_from_slurm` (torch.distributed's RANK/WORLD_SIZE/... from a SLURM task's
environment) and `SubmitCheck`, the Hydra callback the `conf/hydra/launcher/slurm*.yaml` profiles add:
on the submitting side every job's config must convert (value checks included) and have its own run
dir, so a bad sweep fails before anything is queued.

`Preempted` is a SystemExit: code that catches Exception lets it through, and the training loop can
tell it from a crash (run.json keeps "preempted", not "failed").

Limits: handlers can only be installed from the main thread (elsewhere the guard warns and stays
inert). Each rank sees its own signal, hence the all-reduce above. Child processes receive SLURM's
signals too (the whole step is signalled) and die of them by default: start worker pools inside
`shield_children()`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from hydra.experimental.callback import Callback

GUARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# MASTER_PORT = PORT_BASE + job id mod PORT_SPAN: below Linux's ephemeral range (32768+), distinct for
# jobs sharing a node unless their ids differ by a multiple of PORT_SPAN.
PORT_BASE, PORT_SPAN = 12000, 20000


# ------------------------------------------------------------------------------------ SLURM environment
def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The id that names exactly this SLURM job for scancel/scontrol, or None outside SLURM. For an array
    task that is `<array id>_<task id>`: the raw SLURM_JOB_ID of one task equals the array's own id, and
    `scancel --signal=USR2 <that id>` would signal every task of the array."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: "gpu[003-005,010],cpu1" -> "gpu003" (what `scontrol show
    hostnames` prints first), without calling scontrol."""
    text = nodelist.strip()
    if not text or text.count("[") != text.count("]"):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM hostlist like 'node[01-04],gpu7'")
    item = re.match(r"(?:[^,\[]|\[[^\]]*\])+", text).group(0)  # the first comma-separated entry
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], item)


def dist_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's environment for one SLURM task (one process per task, e.g. from `srun` or a
    submitit job with tasks_per_node = GPUs): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.

    MASTER_ADDR is the job's first node and MASTER_PORT is derived from the job id, so every task of a
    job computes the same pair with no communication. A MASTER_ADDR/MASTER_PORT already in `env` (set by
    slurm/env.sh or by hand) is kept. Use: `os.environ.update(dist_env_from_slurm(os.environ))`.
    """
    rank, world = _int_var(env, "SLURM_PROCID"), _int_var(env, "SLURM_NTASKS")
    local_rank, job = _int_var(env, "SLURM_LOCALID"), _int_var(env, "SLURM_JOB_ID")
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside [0, SLURM_NTASKS={world})")
    if not 0 <= local_rank <= rank:
        raise ValueError(f"SLURM_LOCALID={local_rank} must be in [0, SLURM_PROCID={rank}]")
    addr = env.get("MASTER_ADDR") or first_host(_var(env, "SLURM_JOB_NODELIST"))
    port = env.get("MASTER_PORT") or str(PORT_BASE + job % PORT_SPAN)
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": addr, "MASTER_PORT": port}


def _var(env: Mapping[str, str], key: str) -> str:
    if not env.get(key):
        raise ValueError(f"{key} is not set: this is not a SLURM task (run under srun / a submitit job), or "
                         f"outside SLURM set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT yourself")
    return env[key]


def _int_var(env: Mapping[str, str], key: str) -> int:
    value = _var(env, key)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


# ---------------------------------------------------------------------------------------------- guard
class PreemptionGuard:
    """Turns SIGUSR1/SIGUSR2/SIGTERM into a flag for the duration of a `with` block; the previous
    handlers come back on exit. `requested` is True once a signal arrived, `signal` is the last one."""

    def __init__(self, signals: Sequence[signal.Signals] = GUARDED):
        self.signals = tuple(signals)
        self.requested = False
        self.signal: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._submitit: Any = None  # submitit's requeue handler, when we run inside a submitit job

    def __enter__(self) -> PreemptionGuard:
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
                self._submitit = self._submitit or _submitit_requeue_handler(self._previous[sig])
        except ValueError:  # not the main thread: Python only lets the main thread install handlers
            self._restore()
            warnings.warn("PreemptionGuard: not in the main thread, so signals keep their default handling "
                          "(a preemption will not checkpoint first)", RuntimeWarning, stacklevel=2)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the step in flight finishes, then the loop checkpoints and calls exit_for_requeue.
        self.requested, self.signal = True, signal.Signals(signum)
        # os.write, not print: the handler may run in the middle of a print to stderr (tqdm), and a
        # buffered stream entered twice raises "reentrant call"
        os.write(2, f"[preempt] {self.signal.name} received: stopping after this step, checkpoint first\n".encode())

    def exit_for_requeue(self, run_dir: Path | str | None = None) -> NoReturn:
        """Call after the checkpoint of the current step is saved (on every rank, `run_dir` on rank 0 only).
        Marks run.json "preempted", requeues the SLURM job when the signal asks for it (see the module
        docstring) and raises `Preempted`. A guard that saw no signal itself stops because another rank
        was signalled, and acts as for SIGUSR2."""
        sig = self.signal or signal.SIGUSR2
        job = slurm_job_id()
        if run_dir is not None:
            _record_preemption(Path(run_dir), sig, job)
        code = 128 + int(sig)  # the shell's convention for "ended by this signal"
        if job is None:
            _say(f"stopped by {sig.name} after the checkpoint; run the same command again to resume")
            raise Preempted(code)
        if sig == signal.SIGTERM:
            _say(f"SLURM is ending job {job} ({sig.name}); checkpoint saved, not requeueing (a job SLURM "
                 f"preempts with PreemptMode=REQUEUE comes back by itself; otherwise resubmit the command)")
            raise Preempted(code)
        if self._submitit is not None:
            # submitit's own path: launcher.checkpoint() -> pickle -> scontrol requeue -> sys.exit(-1). It
            # returns on ranks other than 0, which leave the requeue to rank 0.
            try:
                self._submitit(int(sig), None)
            except SystemExit as e:
                raise Preempted(e.code) from None
            raise Preempted(code)
        if os.environ.get("SLURM_PROCID", "0") == "0":  # one requeue per job, not one per task
            _say(f"requeueing SLURM job {job} after {sig.name}")
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                _say(f"`scontrol requeue {job}` failed ({done.stderr.strip()}); resubmit the command to resume")
        raise Preempted(code)


class Preempted(SystemExit):
    """Raised by `exit_for_requeue`: the run stopped after checkpointing and resumes later. A SystemExit,
    so nothing that catches Exception swallows it; the exit code is 128+signal (-1 from submitit)."""


def _submitit_requeue_handler(handler: Any) -> Any:
    """`handler` if it is submitit's checkpoint-and-requeue signal handler (a bound method), else None."""
    owner = getattr(handler, "__self__", None)
    is_submitit = type(owner).__module__.startswith("submitit.")
    return handler if is_submitit and getattr(handler, "__name__", "") == "checkpoint_and_try_requeue" else None


def _record_preemption(run_dir: Path, sig: signal.Signals, job: str | None) -> None:
    from mtp_occ.log import read_run_json, update_run_json
    from mtp_occ.rundir import timestamp

    history = read_run_json(run_dir).get("preemptions", [])
    event = {"signal": sig.name, "time": timestamp(), "slurm_job_id": job}
    update_run_json(run_dir, status="preempted", preemptions=[*history, event])


def _say(message: str) -> None:
    print(f"[preempt] {message}", file=sys.stderr, flush=True)


@contextmanager
def shield_children(signals: Sequence[signal.Signals] = (signal.SIGUSR1, signal.SIGUSR2)) -> Iterator[None]:
    """Start worker processes inside this block and SLURM's preemption signals cannot kill them.

    SLURM signals every process of a job step, not just the task: a grading pool's workers, its forkserver
    and multiprocessing's resource tracker keep the default action for SIGUSR1/SIGUSR2, which is to die.
    The signals are *blocked* in this thread while the children start, and a blocked mask survives fork
    and exec, so the children never see them. This process still does (unlike with SIG_IGN, nothing is
    lost): another thread takes a signal at once, or this one when the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ------------------------------------------------------------------------------- submit-side check
class SubmitCheck(Callback):
    """A Hydra callback (`hydra.callbacks` in conf/hydra/launcher/slurm*.yaml) that refuses a multirun
    before anything is queued when a job's config would fail in the job, or two jobs share a run dir.

    Hydra's sweeper composes every job before launching (unknown keys, wrong types, `regime=nope`), but
    value checks (`algo.group_size=1`) run in `__post_init__` when the job converts its config: on a
    compute node, after queueing. This expands the sweep as Hydra's basic sweeper will and converts each
    job's config exactly as `mtp_occ.run` does in the job. Other sweepers are left unchecked.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.global_hydra import GlobalHydra

        if config.hydra.sweeper.get("_target_", "").rsplit(".", 1)[-1] != "BasicSweeper":
            return
        loader = GlobalHydra.instance().config_loader()
        problems = check_jobs(loader, config, sweep_jobs(loader, config))
        if problems:
            print("error: nothing was submitted:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
            sys.exit(2)  # SystemExit: Hydra turns any Exception a callback raises into a warning


def sweep_jobs(config_loader: Any, config: Any) -> list[list[str]]:
    """The per-job override lists Hydra's basic sweeper will launch for this multirun config."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_jobs(config_loader: Any, sweep_config: Any, job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """Convert each job's config as `mtp_occ.run` will in the job; return one line per distinct problem
    (a problem shared by several jobs names the first and counts the rest)."""
    import copy

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from mtp_occ.config import to_config
    from mtp_occ.run import _one_line as one_line  # the CLI's one-line wording of composition errors

    problems: dict[str, list[str]] = {}  # message -> the jobs it applies to
    run_dirs: dict[Path, int] = {}
    saved = HydraConfig.instance().cfg
    try:
        for idx, overrides in enumerate(job_overrides):
            label = f"job #{idx} ({' '.join(overrides) or 'no overrides'})"
            try:
                job_cfg = config_loader.load_sweep_config(sweep_config, list(overrides))
                HydraConfig.instance().set_config(job_cfg)  # the run name resolves from this job's overrides
                task_cfg = copy.deepcopy(job_cfg)
                with read_write(task_cfg), open_dict(task_cfg):
                    del task_cfg["hydra"]
                run_dir = to_config(task_cfg).run_dir
            except Exception as e:  # noqa: BLE001 - ConfigError, OmegaConf and Hydra errors: all are reported
                problems.setdefault(one_line(e), []).append(label)
                continue
            if run_dir in run_dirs:
                problems.setdefault(
                    f"same run dir {run_dir} as job #{run_dirs[run_dir]}; keys excluded from run names "
                    f"(mtp_occ.config.NAME_EXCLUDE) do not tell jobs apart: set name=... per job or sweep a key "
                    f"that names runs", []).append(label)
            run_dirs.setdefault(run_dir, idx)
    finally:
        HydraConfig.instance().cfg = saved
    more = {1: "", 2: " (and 1 more job)"}
    return [f"{jobs[0]}: {message}{more.get(len(jobs), f' (and {len(jobs) - 1} more jobs)')}"
            for message, jobs in problems.items()]
