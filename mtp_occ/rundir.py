"""The run dir, defined once: the name of every file and folder under `<run_root>/<name>/`, the atomic
write every rewritten file in it goes through, and the time format run.json records.

    <run_root>/<name>/          RunDir(cfg.run_dir)
      overrides.txt             .overrides       the command line's overrides, one a line (`python -m
                                                 mtp_occ.eval RUN` recomposes the config from them)
      config.yaml               .config          the resolved config
      run.json                  .run_json        status, times, provenance, wandb id, and the preemptions
                                                 (`mtp_occ.log.update_run_json`, `mtp_occ.preempt`)
      metrics.jsonl             .metrics         one JSON line per step (`mtp_occ.log.RunLogger`)
      metrics.jsonl.prev        .metrics_prev    the metrics.jsonl a fresh start found there, set aside
      checkpoints/              .checkpoints     step_000050/{state.pt, COMPLETE} and `latest`, the name
                                                 of the newest complete one (`mtp_occ.checkpoint`)
      eval/                     .eval            the last evaluation: summary.json, samples.jsonl (EvalDir)
        step_<n>/summary.json   .eval.step_summary(n)   the summary of the evaluation at step n
        base/                   .base_eval       the starting policy's evaluation (EvalDir)
        <ckpt>[-<overrides>]/   .checkpoint_eval(...)   `python -m mtp_occ.eval RUN [overrides]` (EvalDir)
      wandb/                    .wandb           wandb's files, when WANDB_DIR does not send them elsewhere

An evaluation dir (`EvalDir`) has the same layout wherever it is: inside a run dir, in the base-model
cache, or at `python -m mtp_occ.eval --out DIR`. Checkpoint dirs are zero-padded (`step_000050`, so they
sort by name), per-step evaluation dirs are not (`step_50`).

`atomic_write_text` / `atomic_write_bytes` replace a file so that a reader, or a crash at any moment,
finds the old content or the new one, never a part: a temp file in the same dir (its name holds
`TMP_MARK`, so a torn write is recognisable and `mtp_occ.checkpoint` cleans it up), written, fsynced,
then `os.replace`d over the target. No torch here: `analysis` reads run dirs through this module.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

OVERRIDES_FILE = "overrides.txt"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"  # one row per optimizer update at diagnostics steps
PREV_SUFFIX = ".prev"  # a set-aside older copy: metrics.jsonl.prev
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"  # in checkpoints/: the name of the newest complete checkpoint
STATE_FILE = "state.pt"  # in a checkpoint: everything a resumed run needs
COMPLETE_FILE = "COMPLETE"  # in a checkpoint: written last, so its presence means the rest is whole
CHECKPOINT_GLOB = "step_*"
EVAL_DIR = "eval"
BASE_EVAL_DIR = "base"  # under eval/
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"
WANDB_DIR = "wandb"  # wandb's own choice of name, under WANDB_DIR (the run dir by default)
TMP_MARK = ".tmp-"  # in the name of everything not yet renamed into place
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # run.json's start_time, end_time and preemption times


def checkpoint_name(step: int) -> str:
    """`step_000050`: zero-padded, so that checkpoint dirs sort by name in step order."""
    return f"step_{step:06d}"


@dataclass(frozen=True)
class EvalDir:
    """One evaluation's output dir (`mtp_occ.eval.runner.evaluate`'s `out_dir`). A str root is
    accepted and stored as a Path."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def summary(self) -> Path:
        """Settings and per-benchmark avg/pass/maj with CIs of the last evaluation written here."""
        return self.root / SUMMARY_FILE

    @property
    def samples(self) -> Path:
        """Every graded sample of the last evaluation (overwritten by the next: they run to GBs)."""
        return self.root / SAMPLES_FILE

    def step_summary(self, step: int) -> Path:
        """The summary of the evaluation at training step `step`, kept when later ones overwrite
        `summary`."""
        return self.root / f"step_{step}" / SUMMARY_FILE


@dataclass(frozen=True)
class RunDir:
    """The paths inside one run dir `<run_root>/<name>/` (see the module docstring). A str root is
    accepted and stored as a Path; nothing is created or read."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def overrides(self) -> Path:
        return self.root / OVERRIDES_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.root / RUN_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def metrics_prev(self) -> Path:
        return self.root / (METRICS_FILE + PREV_SUFFIX)

    @property
    def diagnostics(self) -> Path:
        """Per-update rows `{"step", "update", ...}` at `diagnostics.every` steps (`RunLogger.log_updates`)."""
        return self.root / DIAGNOSTICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def eval(self) -> EvalDir:
        """The training run's own evaluations: the final one, and each periodic one's summary."""
        return EvalDir(self.root / EVAL_DIR)

    @property
    def base_eval(self) -> EvalDir:
        """The starting policy's evaluation, before any RL step."""
        return EvalDir(self.root / EVAL_DIR / BASE_EVAL_DIR)

    def checkpoint_eval(self, checkpoint: str, overrides: Sequence[str] = ()) -> EvalDir:
        """Where `python -m mtp_occ.eval` puts its evaluation of `checkpoint` (a checkpoint dir's name)
        under `overrides`: one dir per (checkpoint, overrides), so no two settings overwrite each other."""
        tag = checkpoint + ("-" + "_".join(overrides) if overrides else "")
        return EvalDir(self.root / EVAL_DIR / tag)

    @property
    def wandb(self) -> Path:
        return self.root / WANDB_DIR


# ------------------------------------------------------------------------------------------ writing
def atomic_write_text(path: Path, text: str | Iterable[str], *, sync_dir: bool = False) -> None:
    """Replace `path` with `text` (UTF-8): one string, or chunks written in order, so that a file of
    GBs is streamed rather than built in memory first. See `atomic_write_bytes`."""
    _atomic_write(path, [text] if isinstance(text, str) else text, binary=False, sync_dir=sync_dir)


def atomic_write_bytes(path: Path, data: bytes, *, sync_dir: bool = False) -> None:
    """Replace `path` with `data`: readers and crashes see the old file or the new one, never a part.
    The temp file (same dir, `TMP_MARK` in its name) is fsynced before the rename and removed on an
    error. It takes the old file's permissions, 0o644 for a new file (mkstemp's 0o600 would hide run
    files from the rest of a group). `sync_dir` also fsyncs the parent dir, so the rename itself
    survives a power loss: needed where later writes rely on this one (a checkpoint's `latest`)."""
    _atomic_write(path, [data], binary=True, sync_dir=sync_dir)


def _atomic_write(path: Path, chunks: Iterable[str] | Iterable[bytes], *, binary: bool,
                  sync_dir: bool) -> None:
    path = Path(path)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make the entries of dir `path` durable (a rename into it, a file created in it)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def timestamp() -> str:
    """Local time with its UTC offset, e.g. 2026-01-01T12:00:00+0100: run.json's time format."""
    return time.strftime(TIME_FORMAT)
