"""Atomic checkpoints: a run killed at any point resumes from its last complete checkpoint.

Layout (names from `mtp_occ.rundir`): `<run_dir>/checkpoints/step_000050/state.pt` (+ `COMPLETE`), and
`checkpoints/latest` naming the newest complete one. A save writes into `step_XXXXXX.tmp-save/`, fsyncs the
files, renames the directory into place, fsyncs the parent, and only then replaces `latest`
(`rundir.atomic_write_bytes`: temp file + fsync + `os.replace` + fsync of the dir). A crash at any moment
therefore leaves either the previous checkpoint or the new one, never a torn one; leftover `*.tmp-*`
entries are ignored and cleaned on the next save. If `latest` is missing or names something incomplete,
the newest directory with `COMPLETE` is used.

`state.pt` holds everything that decides the rest of the run: model (MTP layers included), optimizer,
LR scheduler, sampler position, regime state (OCC's EMA), RNG states and the step. Non-finite weights are
refused: a NaN never reaches a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mtp_occ.rundir import (
    CHECKPOINT_GLOB,
    COMPLETE_FILE,
    LATEST_FILE,
    STATE_FILE,
    TMP_MARK,
    atomic_write_bytes,
    checkpoint_name,
    fsync_dir,
)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota, permissions): says where, what is intact and
    how to go on."""


@contextlib.contextmanager
def _writing(ckpt_root: Path, tmp: Path, step: int):
    """An OSError inside becomes a `CheckpointWriteError` (see `_write_failed`)."""
    try:
        yield
    except OSError as e:
        raise _write_failed(ckpt_root, tmp, step, e) from e


def _write_failed(ckpt_root: Path, tmp: Path, step: int, err: OSError) -> CheckpointWriteError:
    """Remove the torn temp dir and describe the failure: the previous checkpoint is untouched (a save
    renames into place only when everything is written)."""
    def du(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    shutil.rmtree(tmp, ignore_errors=True)
    last = latest(ckpt_root)
    kept = (f"the last complete checkpoint, {last} ({du(last) / 2**30:.2f} GiB), is intact and the same command "
            f"resumes from it" if last is not None else "there is no earlier checkpoint: a rerun starts at step 1")
    return CheckpointWriteError(err.errno, f"could not write the checkpoint of step {step} under {ckpt_root}: "
                                f"{err.strerror or err}. The partial write was removed; {kept}. Free space there "
                                "(or set keep_checkpoints lower) and rerun.")


def save(ckpt_root: Path, step: int, state: dict[str, Any], keep: int = 2, *, is_main: bool = True,
         shards: Callable[[Path], None] | None = None) -> Path:
    """Write `state` (+ RNG states) as step `step` atomically; keep the newest `keep` checkpoints (0: all).
    Call on every rank: rank 0 (`is_main`) writes `state.pt` and renames; `shards(tmp_dir)`, if given,
    lets every rank add its own files (DeepSpeed ZeRO) before the rename."""
    from mtp_occ.dist import barrier

    model_state = state.get("engine", {}).get("model", {})
    bad = [k for k, v in model_state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite values in {bad[:3]}")
    name = checkpoint_name(step)
    tmp = ckpt_root / f"{name}{TMP_MARK}save"  # one name for every rank: each adds its shards to it
    if is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f"*{TMP_MARK}*"):  # torn saves: dirs, and `.latest.tmp-*` files
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        with _writing(ckpt_root, tmp, step):
            tmp.mkdir()
            with open(tmp / STATE_FILE, "wb") as f:
                torch.save({**state, "step": step, "rng": rng_state()}, f)
                f.flush()
                os.fsync(f.fileno())
    barrier()
    if shards is not None:
        with _writing(ckpt_root, tmp, step):
            shards(tmp)
        barrier()
    final = ckpt_root / name
    if is_main:
        with _writing(ckpt_root, tmp, step):
            atomic_write_bytes(tmp / COMPLETE_FILE, b"ok\n", sync_dir=True)
        if final.exists():  # re-saving a step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
        atomic_write_bytes(ckpt_root / LATEST_FILE, name.encode(), sync_dir=True)
        for old in complete_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob(CHECKPOINT_GLOB) if p.is_dir() and (p / COMPLETE_FILE).exists()
                  and TMP_MARK not in p.name)


def latest(ckpt_root: Path) -> Path | None:
    pointer = ckpt_root / LATEST_FILE
    if pointer.exists():
        cand = ckpt_root / pointer.read_text().strip()
        if (cand / COMPLETE_FILE).exists():
            return cand
    done = complete_checkpoints(ckpt_root)
    return done[-1] if done else None


def load(ckpt_dir: Path) -> dict[str, Any]:
    state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state


def model_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a checkpoint: from `state.pt`, or gathered from ZeRO shards."""
    state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
    if "model" in state.get("engine", {}):
        return state["engine"]["model"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
