"""Run logging: `metrics.jsonl` in the run dir always (the source of truth), wandb when enabled.

    logger = RunLogger(run_dir, config=cfg_dict, name=cfg.name, mode="offline", resume_step=start - 1)
    logger.log({"reward/mean": 0.41, "loss/pg": 0.02}, step=7)
    logger.log(flat_metrics(summary), step=200, samples_path=RunDir(run_dir).eval.samples)  # an evaluation
    logger.finish("finished")

Only rank 0 logs; every other rank gets a logger whose methods do nothing, so the training loop never
branches on rank. Each `log` call appends one JSON line `{"step": s, ...}` to `metrics.jsonl` and
fsyncs it *before* wandb sees the numbers: a crash loses at most the step in flight, and analysis reads
run dirs first (`analysis.runs`), wandb second. An evaluation is logged as flat `eval/<bench>/<stat>`
metrics (`mtp_occ.eval.runner.flat_metrics`; the training loop puts them in that step's line) with
`samples_path`, which adds up to TABLE_MAX_ROWS samples (the first sample of each problem) as the wandb
table `eval/samples`. `run.json` is shared with the training loop: both write it through
`update_run_json` (read-modify-write, atomic), never a blind overwrite. File names and the atomic write
are `mtp_occ.rundir`'s.

wandb is imported lazily and can never take a run down: `online` without a login, or with the server
unreachable, warns once and continues `offline` (files in `<run_dir>/wandb/offline-run-*`, readable
with `wandb leet inspect` and uploadable later with `wandb sync`). `WANDB_DIR` defaults to the run dir.

Resume (a requeued job restarting after checkpoint step s passes `resume_step=s`): `metrics.jsonl` is
rewritten atomically keeping only lines with step <= s and no torn last line, so no step appears
twice. The wandb run id is stored in `run.json` (key `wandb_id`; generated here, as wandb 0.31 has no
public id generator) and reused with `resume="allow"`.
Departure to know about: wandb itself cannot rewind, so online it keeps its first copy of the steps
s+1.. that ran before the crash and ignores the re-run ones (it warns); `metrics.jsonl` has the re-run
ones. Offline, each attempt is its own `offline-run-*` dir under the same id and `analysis.runs`
merges them with the later attempt winning.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import warnings
from pathlib import Path
from typing import Any

from mtp_occ.rundir import PREV_SUFFIX, RunDir, atomic_write_text

WANDB_MODES = ("online", "offline", "disabled")
INIT_TIMEOUT_S = 15.0  # bounds wandb's handshake with the server; on expiry we go offline
TABLE_MAX_ROWS = 2000  # samples shown in the wandb eval table (all of them stay in samples.jsonl)
TABLE_MAX_CHARS = 4000  # per text cell: head and tail kept, the middle elided

_warned_offline = False  # warn about an online -> offline fallback once per process


# ------------------------------------------------------------------------------------- files on disk
def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, in file order. A torn last line (a crash mid-write) is
    skipped. Eval records may share a step with the training record of that step."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the last line can be torn; a blank line is harmless too
    return records


def truncate_metrics(run_dir: Path | str, resume_step: int, path: Path | None = None) -> int:
    """Atomically rewrite `metrics.jsonl` (or the per-step jsonl `path`) keeping the complete lines with
    step <= `resume_step`. Returns the number of lines dropped."""
    path = RunDir(run_dir).metrics if path is None else path
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= resume_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def read_run_json(run_dir: Path | str) -> dict[str, Any]:
    """`run_dir/run.json`, or {} before the first write."""
    path = RunDir(run_dir).run_json
    return json.loads(path.read_text()) if path.exists() else {}


def update_run_json(run_dir: Path | str, **fields: Any) -> dict[str, Any]:
    """Read-modify-write `run_dir/run.json` atomically (temp file + os.replace); returns the result.
    The training loop and the logger both write this file: use this, never a blind overwrite."""
    data = read_run_json(run_dir)
    data.update(fields)
    atomic_write_text(RunDir(run_dir).run_json, json.dumps(data, indent=2) + "\n")
    return data


def _stable_wandb_id(run_dir: Path) -> str:
    existing = read_run_json(run_dir).get("wandb_id")
    if existing:
        return existing
    # wandb's own alphabet and length; `wandb.util.generate_id` is gone in wandb 0.31
    new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    return update_run_json(run_dir, wandb_id=new_id)["wandb_id"]


# ------------------------------------------------------------------------------------------- logger
class WandbFallbackWarning(UserWarning):
    """wandb could not go online (no login, server unreachable) or failed mid-run; metrics.jsonl is intact."""


class RunLogger:
    """Rank 0 writes `metrics.jsonl` and (mode != "disabled") a wandb run; other ranks do nothing.

    `mode`: "online" | "offline" | "disabled". `resume_step`: the checkpoint step a resumed run restarts
    after (None for a fresh run; a fresh run that finds an old `metrics.jsonl` moves it to
    `metrics.jsonl.prev`). Also a context manager: leaving the block finishes with "finished", or with
    "failed" on an exception.
    """

    def __init__(
        self,
        run_dir: Path | str,
        *,
        config: dict[str, Any],
        name: str,
        mode: str = "offline",
        project: str = "mtp_occ",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "train",
        resume_step: int | None = None,
        rank: int = 0,
    ):
        self.run_dir = Path(run_dir)
        self._file = None
        self._wandb_run = None
        if rank != 0:
            return
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r} (set wandb.mode=...)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open_metrics(resume_step)
        diagnostics = RunDir(self.run_dir).diagnostics
        if resume_step is not None:  # rows of steps after the checkpoint are written again
            truncate_metrics(self.run_dir, resume_step, diagnostics)
        elif diagnostics.exists():
            os.replace(diagnostics, diagnostics.with_name(diagnostics.name + PREV_SUFFIX))
        if mode != "disabled":
            wandb_dir = Path(os.environ.get("WANDB_DIR", self.run_dir))
            wandb_dir.mkdir(parents=True, exist_ok=True)
            init_args = dict(project=project, entity=entity, group=group, tags=list(tags or []),
                             job_type=job_type, name=name, config=config, dir=str(wandb_dir))
            self._wandb_run = _init_wandb(self.run_dir, mode, init_args)

    @property
    def wandb_run(self) -> Any:
        """The live `wandb.Run`, or None (disabled, not rank 0, or wandb failed)."""
        return self._wandb_run

    def log(self, metrics: dict[str, float], step: int, samples_path: Path | str | None = None) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl (fsynced), then send it to wandb; with
        `samples_path` (an eval's samples.jsonl) also the wandb table `eval/samples`."""
        if self._file is None:
            return
        metrics = {k: _scalar(v) for k, v in metrics.items()}
        self._append(metrics, step)
        if self._wandb_run is not None and samples_path is not None and Path(samples_path).exists():
            table = _samples_table(Path(samples_path))
            if table is not None:
                metrics = {**metrics, "eval/samples": table}
        self._wandb_log(metrics, step)

    def log_updates(self, rows: list[dict[str, float]], step: int) -> None:
        """Append one `{"step": step, "update": u, **row}` line per optimizer update to diagnostics.jsonl
        (fsynced; rank 0 only). The step's metrics.jsonl line holds their mean, which mixes signs."""
        if self._file is None or not rows:
            return
        with open(RunDir(self.run_dir).diagnostics, "a") as f:
            for u, row in enumerate(rows):
                f.write(json.dumps({"step": int(step), "update": u, **{k: _scalar(v) for k, v in row.items()}}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, status: str = "finished") -> None:
        """Close metrics.jsonl and the wandb run (exit code 0 only for status "finished"). Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            try:
                run.summary["status"] = status
                run.finish(exit_code=0 if status == "finished" else 1)
            except Exception as e:  # noqa: BLE001 - wandb must not fail the run at its very end
                _warn(f"wandb finish failed ({e!r}); metrics.jsonl is complete")

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("failed" if exc_type is not None else "finished")

    # ------------------------------------------------------------------------------------- internals
    def _open_metrics(self, resume_step: int | None) -> None:
        path, prev = RunDir(self.run_dir).metrics, RunDir(self.run_dir).metrics_prev
        if resume_step is not None:
            truncate_metrics(self.run_dir, resume_step)
        elif path.exists() and path.stat().st_size > 0:
            os.replace(path, prev)
            warnings.warn(f"{path} existed on a fresh start; moved it to {prev.name}", stacklevel=3)
        self._file = open(path, "a")  # noqa: SIM115 - held open for the run's lifetime

    def _append(self, metrics: dict[str, Any], step: int) -> None:
        # json writes NaN/Infinity as bare tokens: not strict JSON, but Python and pandas read them back
        self._file.write(json.dumps({"step": int(step), **metrics}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _wandb_log(self, metrics: dict[str, Any], step: int) -> None:
        if self._wandb_run is None:
            return
        try:
            self._wandb_run.log(metrics, step=int(step))
        except Exception as e:  # noqa: BLE001 - wandb must never take the run down
            _warn(f"wandb.log failed ({e!r}); wandb is off for the rest of this run, metrics.jsonl goes on")
            self._wandb_run = None


def _init_wandb(run_dir: Path, mode: str, init_args: dict[str, Any]) -> Any:
    """wandb.init with a stable id; online falls back to offline, offline failing means no wandb."""
    import wandb

    # create_new: a second logger in the process (an eval job after training) must not end the first
    init_args = {**init_args, "id": _stable_wandb_id(run_dir), "resume": "allow", "reinit": "create_new"}
    if mode == "online":
        # silent: otherwise wandb looks up the user name to greet them, unbounded by init_timeout
        # (~8 s more against an unreachable server).
        settings = wandb.Settings(init_timeout=INIT_TIMEOUT_S, silent=True)
        try:
            run = wandb.init(mode="online", settings=settings, **init_args)
            print(f"wandb: logging online to {run.url}")
            return run
        except Exception as e:  # noqa: BLE001 - no login, no network, server down: all mean offline
            _warn_once(f"wandb could not go online ({type(e).__name__}: {str(e).splitlines()[0]}); "
                  f"logging offline to {init_args['dir']}/wandb (upload later with `wandb sync`)")
            if not isinstance(e, wandb.errors.UsageError):  # no login fails before anything starts
                # a failed handshake leaves the run id registered in wandb's service, which would
                # refuse the offline run; teardown clears it (and would end any other live run)
                try:
                    wandb.teardown()
                except Exception:  # noqa: BLE001
                    pass
    try:
        return wandb.init(mode="offline", settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S), **init_args)
    except Exception as e:  # noqa: BLE001
        _warn(f"wandb offline init failed ({e!r}); only metrics.jsonl is written")
        return None


def _warn(message: str) -> None:
    warnings.warn(message, WandbFallbackWarning, stacklevel=3)


def _warn_once(message: str) -> None:
    global _warned_offline
    if not _warned_offline:
        _warned_offline = True
        _warn(message)


def _scalar(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value  # 0-d tensors and numpy scalars


def _samples_table(path: Path) -> Any:
    import wandb

    from mtp_occ.eval.runner import SAMPLE_FIELDS

    columns = list(SAMPLE_FIELDS)
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("sample", 0) != 0:
                continue
            rows.append([_clip(rec.get(c)) for c in columns])
            if len(rows) >= TABLE_MAX_ROWS:
                break
    return wandb.Table(columns=columns, data=rows) if rows else None


def _clip(value: Any) -> Any:
    if not isinstance(value, str) or len(value) <= TABLE_MAX_CHARS:
        return value
    half = TABLE_MAX_CHARS // 2  # keep the tail: the answer is at the end of a completion
    return f"{value[:half]} […{len(value) - 2 * half} chars…] {value[-half:]}"
