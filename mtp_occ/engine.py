"""The optimisation backend: plain PyTorch (any world size) or DeepSpeed ZeRO 1–3, behind one interface
(`Engine`), built from the sections it reads (`algo`, `deepspeed`) and the run's length (`build_engine`).

    per update:   engine.zero_grad(); engine.backward(loss, last) per micro-batch
                  norm, mtp_norm, applied = engine.step(finite)
    per RL step:  engine.scheduler_step()

Both engines run AdamW under a `LambdaLR` whose multiplier comes from `mtp_occ.schedules`
(`algo.lr_schedule`, `algo.lr_warmup_steps`, the run's `steps`).

`TorchEngine`: gradients summed over ranks in one flat all-reduce (losses are normalised by global
counts, see `mtp_occ.dist`), the shared model and the MTP layers clipped as two groups (`clip_grads`),
the update skipped when a gradient is non-finite.

`DeepSpeedEngine`: the DeepSpeed config is *derived* from ours (`deepspeed_config`; no "auto" values):
micro-batch, accumulation, clipping, ZeRO stage, optimizer offload, bf16. Departures forced by DeepSpeed:
it averages gradients over ranks, so the loss is scaled by the world size; its clipping is one global norm
(the MTP layers share it, and `grad/mtp_norm` is not measured: NaN); we mark the accumulation boundary
ourselves, since the number of micro-steps per update is ours to decide. Under ZeRO-3 the MTP layers read
the (partitioned) embedding and head weights outside those modules' forward, so they are registered as
external parameters of the model, and generation runs with `synced_gpus=True` on every rank. Checkpoints
go through the engine (ZeRO shards, MTP weights included) inside our atomic protocol (`mtp_occ.checkpoint`).

Known limit under DeepSpeed: a non-finite *loss* skips the update as in `TorchEngine`, but a non-finite
gradient behind a finite loss is only visible after DeepSpeed's `step()` (through its global norm; only
fp16's loss scaler checks before), so with bf16/fp32 that one update is applied. The weights then produce
non-finite losses, every following update is skipped, the run stops after `algo.max_bad_steps` steps,
and since checkpoints refuse non-finite weights a rerun resumes from the last good step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from mtp_occ.config import AlgoConfig, DeepSpeedConfig
from mtp_occ.dist import all_reduce_grads_
from mtp_occ.schedules import build_lr_schedule

if TYPE_CHECKING:
    from mtp_occ.model.mtp import MTPModel


class Engine(Protocol):
    """What `mtp_occ.update.rl_update` and the training loop call; `TorchEngine` and `DeepSpeedEngine`
    implement it. One optimizer update is `zero_grad()`, `backward(loss, last)` per micro-batch, then
    `step(finite, before_clip)`; the LR schedule advances once per RL step (`scheduler_step`), however
    many updates that step ran."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """`last`: the update's final micro-batch (where ZeRO reduces the accumulated gradients)."""

    def step(self, finite: bool, before_clip: Callable[[], None] | None = None) -> tuple[float, float, bool]:
        """Reduce, clip and apply the accumulated gradients unless `finite` is False or a norm is not
        finite; `before_clip` sees the reduced, unclipped gradients (exact diagnostics). Returns
        `(grad norm, MTP grad norm, applied)`."""

    def scheduler_step(self) -> None: ...

    def lr(self) -> float: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def save_shards(self, tmp_dir: Path) -> None:
        """Whatever every rank must write itself into the checkpoint being assembled in `tmp_dir`."""

    def load_shards(self, ckpt_dir: Path) -> None: ...


def clip_grads(model: MTPModel, max_norm: float) -> tuple[float, float]:
    """Clip the shared model and the MTP layers as two groups. With one global norm, the MTP loss would
    change the shared weights' update under `detach` through the clipping coefficient alone."""
    limit = max_norm or float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.lm.parameters(), limit)
    mtp_norm = torch.nn.utils.clip_grad_norm_(model.mtp.parameters(), limit)
    return float(norm), float(mtp_norm)


def _adamw(model, algo: AlgoConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=algo.lr, betas=tuple(algo.betas),
                             weight_decay=algo.weight_decay)


def _lr_scheduler(opt: torch.optim.Optimizer, algo: AlgoConfig, total_steps: int
                  ) -> torch.optim.lr_scheduler.LambdaLR:
    """`algo.lr_schedule` over the run's `total_steps` RL steps (`mtp_occ.schedules`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, build_lr_schedule(algo.lr_schedule, algo.lr_warmup_steps, total_steps))


class TorchEngine:
    def __init__(self, model, algo: AlgoConfig, *, total_steps: int):
        self.model, self.grad_clip = model, algo.grad_clip
        self.optimizer = _adamw(model, algo)
        self.lr_sched = _lr_scheduler(self.optimizer, algo, total_steps)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def step(self, finite: bool, before_clip: Callable[[], None] | None = None) -> tuple[float, float, bool]:
        """All-reduce, (measure), clip, step unless a gradient is non-finite; returns the norms."""
        all_reduce_grads_(list(self.model.parameters()))
        if before_clip is not None:
            before_clip()
        norm, mtp_norm = clip_grads(self.model, self.grad_clip)
        ok = finite and math.isfinite(norm + mtp_norm)
        if ok:
            self.optimizer.step()
        self.zero_grad()
        return norm, mtp_norm, ok

    def scheduler_step(self) -> None:
        self.lr_sched.step()

    def lr(self) -> float:
        return self.lr_sched.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_sched": self.lr_sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_sched"])

    def save_shards(self, tmp_dir: Path) -> None:
        """Nothing beyond `state_dict` (written by `checkpoint.save` on rank 0)."""

    def load_shards(self, ckpt_dir: Path) -> None:
        """Nothing beyond `load_state_dict`."""


def deepspeed_config(algo: AlgoConfig, deepspeed: DeepSpeedConfig, world: int) -> dict:
    """The DeepSpeed json, derived from our config: one source of truth, no "auto" values."""
    a, z = algo, deepspeed
    per_rank_rows = max(1, a.prompts_per_step * a.group_size // a.updates_per_step // world)
    micro = min(a.micro_batch_size or per_rank_rows, per_rank_rows)
    gas = max(1, math.ceil(per_rank_rows / micro))
    zero: dict = {"stage": z.stage, "overlap_comm": False, "contiguous_gradients": True}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": a.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": z.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, model, algo: AlgoConfig, deepspeed: DeepSpeedConfig, *, total_steps: int, world: int):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(29400 + os.getpid() % 1000))):
            os.environ.setdefault(k, v)  # a single process needs them too (else DeepSpeed looks for MPI)
        import deepspeed as ds_lib

        self.model, self.stage = model, deepspeed.stage
        if self.stage == 3:  # read outside their modules (MTP inputs, chunked log-probs): gathered for the model
            for p in (model.lm.get_input_embeddings().weight, model.lm.get_output_embeddings().weight):
                ds_lib.zero.register_external_parameter(model, p)
        opt = _adamw(model, algo)
        # our scheduler steps once per RL step (DeepSpeed would step it once per optimizer update)
        self.lr_sched = _lr_scheduler(opt, algo, total_steps)
        self.ds, self.optimizer, _, _ = ds_lib.initialize(model=model, optimizer=opt,
                                                          config=deepspeed_config(algo, deepspeed, world))
        self.world = world

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """`last`: the update's final micro-batch, where ZeRO reduces the accumulated gradients."""
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss * self.world, scale_wrt_gas=False)  # DeepSpeed averages over ranks

    def step(self, finite: bool, before_clip: Callable[[], None] | None = None) -> tuple[float, float, bool]:
        """DeepSpeed clips and steps; the norm is its global one. The MTP norm is NaN, *not measured*:
        ZeRO partitions the gradients and DeepSpeed clips one global norm, so no separate MTP norm exists
        (0.0 would read as "the MTP layers got no gradient")."""
        if before_clip is not None:
            raise NotImplementedError("exact diagnostics need deepspeed=none (ZeRO partitions the gradients)")
        if not finite:
            self.ds.zero_grad()
            return float("nan"), float("nan"), False
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, float("nan"), math.isfinite(norm)

    def scheduler_step(self) -> None:
        self.lr_sched.step()

    def lr(self) -> float:
        return self.lr_sched.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"lr_sched": self.lr_sched.state_dict()}  # the rest lives in the engine's shards

    def load_state_dict(self, state: dict) -> None:
        self.lr_sched.load_state_dict(state["lr_sched"])

    def save_shards(self, tmp_dir: Path) -> None:
        """Every rank writes its ZeRO shards into `tmp_dir` (the atomic rename happens on rank 0)."""
        self.ds.save_checkpoint(str(tmp_dir.parent), tag=tmp_dir.name, save_latest=False)

    def load_shards(self, ckpt_dir: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir}")


def build_engine(model, algo: AlgoConfig, deepspeed: DeepSpeedConfig, *, total_steps: int, world: int
                 ) -> Engine:
    """`total_steps`: the run's RL steps, the horizon of the LR schedule."""
    if deepspeed.enabled:
        return DeepSpeedEngine(model, algo, deepspeed, total_steps=total_steps, world=world)
    return TorchEngine(model, algo, total_steps=total_steps)
