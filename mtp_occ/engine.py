"""The optimisation backend: plain PyTorch (any world size) or DeepSpeed ZeRO 1–3, behind one interface.

    engine.zero_grad(); engine.backward(loss, last) per micro-batch; norms, applied = engine.step(finite)

`TorchEngine`: AdamW, gradients summed over ranks in one flat all-reduce (losses are normalised by global
counts, see `mtp_occ.dist`), the shared model and the MTP layers clipped as two groups (see
`update.clip_grads`), the update skipped when a gradient is non-finite.

`DeepSpeedEngine`: the DeepSpeed config is *derived* from ours (`deepspeed_config`; no "auto" values):
micro-batch, accumulation, clipping, ZeRO stage, optimizer offload, bf16. Departures forced by DeepSpeed:
it averages gradients over ranks, so the loss is scaled by the world size; its clipping is one global norm
(the MTP layers share it); we mark the accumulation boundary ourselves, since the number of micro-steps
per update is ours to decide. Under ZeRO-3 the MTP layers read the (partitioned) embedding and head
weights outside those modules' forward, so they are registered as external parameters of the model,
and generation runs with `synced_gpus=True` on every rank. Checkpoints go through the engine (ZeRO shards,
MTP weights included) inside our atomic protocol (`mtp_occ.checkpoint`).

Known limit under DeepSpeed: a non-finite *loss* skips the update as in `TorchEngine`, but a non-finite
gradient behind a finite loss is only visible after DeepSpeed's `step()` (through its global norm; only
fp16's loss scaler checks before), so with bf16/fp32 that one update is applied. The weights then produce
non-finite losses, every following update is skipped, the run stops after `algo.max_bad_steps` steps,
and since checkpoints refuse non-finite weights a rerun resumes from the last good step.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from mtp_occ.config import Config
from mtp_occ.dist import all_reduce_grads_


def lr_lambda_for(cfg: Config):
    a = cfg.algo

    def lr_lambda(step: int) -> float:
        if step < a.lr_warmup_steps:
            return (step + 1) / a.lr_warmup_steps
        if a.lr_schedule.value == "cosine":
            p = (step - a.lr_warmup_steps) / max(1, cfg.steps - a.lr_warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
        return 1.0

    return lr_lambda


def _adamw(model, cfg: Config) -> torch.optim.Optimizer:
    a = cfg.algo
    return torch.optim.AdamW(model.parameters(), lr=a.lr, betas=tuple(a.betas), weight_decay=a.weight_decay)


class TorchEngine:
    def __init__(self, model, cfg: Config):
        self.model, self.grad_clip = model, cfg.algo.grad_clip
        self.optimizer = _adamw(model, cfg)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda_for(cfg))

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        loss.backward()

    def step(self, finite: bool, before_clip=None) -> tuple[float, float, bool]:
        """All-reduce, (measure), clip, step unless a gradient is non-finite; returns the norms."""
        from mtp_occ.update import clip_grads

        all_reduce_grads_(list(self.model.parameters()))
        if before_clip is not None:
            before_clip()
        norm, mtp_norm = clip_grads(self.model, self.grad_clip)
        ok = finite and math.isfinite(norm + mtp_norm)
        if ok:
            self.optimizer.step()
        self.zero_grad()
        return norm, mtp_norm, ok

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


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed json, derived from our config: one source of truth, no "auto" values."""
    a, z = cfg.algo, cfg.deepspeed
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
    def __init__(self, model, cfg: Config, world: int):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                     ("MASTER_PORT", str(29400 + os.getpid() % 1000))):
            os.environ.setdefault(k, v)  # a single process needs them too (else DeepSpeed looks for MPI)
        import deepspeed

        self.model, self.stage = model, cfg.deepspeed.stage
        if self.stage == 3:  # read outside their modules (MTP inputs, chunked log-probs): gathered for the model
            for p in (model.lm.get_input_embeddings().weight, model.lm.get_output_embeddings().weight):
                deepspeed.zero.register_external_parameter(model, p)
        opt = _adamw(model, cfg)
        # our scheduler steps once per RL step (DeepSpeed would step it once per optimizer update)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_for(cfg))
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                             config=deepspeed_config(cfg, world))
        self.world = world

    def zero_grad(self) -> None:
        self.ds.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool = True) -> None:
        """`last`: the update's final micro-batch, where ZeRO reduces the accumulated gradients."""
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss * self.world, scale_wrt_gas=False)  # DeepSpeed averages over ranks

    def step(self, finite: bool, before_clip=None) -> tuple[float, float, bool]:
        if before_clip is not None:
            raise NotImplementedError("exact diagnostics need deepspeed=none (ZeRO partitions the gradients)")
        if not finite:
            self.ds.zero_grad()
            return float("nan"), float("nan"), False
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, 0.0, math.isfinite(norm)

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


def build_engine(model, cfg: Config, world: int) -> TorchEngine | DeepSpeedEngine:
    return DeepSpeedEngine(model, cfg, world) if cfg.deepspeed.enabled else TorchEngine(model, cfg)
