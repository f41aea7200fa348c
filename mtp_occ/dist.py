"""Data parallelism: process-group setup, gradient synchronisation and metric reduction.

One process per device (`torchrun --nproc_per_node N`, SLURM tasks, or the `deepspeed` launcher); gloo
on CPU, NCCL on GPU. The design goal is that N processes compute *the same update* as one process with
the same global batch:
- each rank generates rollouts for its contiguous block of the step's prompts (groups stay whole), and
  sampling is batch-independent (`mtp_occ.rollout.sampling`), so the union of the ranks' rollouts is the
  single-process batch;
- mini-batch u holds the groups whose step-global index is ≡ u (mod updates_per_step), so each global
  mini-batch is the single-process one (`mtp_occ.update.minibatch_rows`; a rank with fewer groups than
  updates has empty shares of some mini-batches and runs masked stand-ins for them);
- loss normalisers (token / sequence counts) are all-reduced, so each rank's loss is its share of the
  global mini-batch loss and the *summed* gradients are the global gradient;
- OCC's ĉ and v̂² are all-reduced (`mtp_occ.rl.occ`), so every rank uses one λ;
- every rank runs the same number of micro-steps (a rank with fewer rows runs a masked-out dummy row), so
  the collectives inside a step always line up.
Rank 0 alone logs and writes files (DeepSpeed checkpoints are written by every rank, as ZeRO requires).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available on this machine: use device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT; SLURM tasks get them from SLURM's variables); a single process
    needs nothing."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from mtp_occ.preempt import dist_env_from_slurm

        os.environ.update(dist_env_from_slurm(os.environ))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, device)


def shutdown() -> None:
    """Barrier + destroy: without it gloo runs abort at exit (SIGABRT) in a large share of runs."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if _active():
        dist.barrier()


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block, then the other ranks do: for a cache that one rank fills and the others read
    (a pre-trained base, a converted model dir). Needed beyond a file lock: transformers' `save_pretrained`
    writes nothing on a rank other than 0 once a process group exists, so a rank 1 that won the lock would
    leave a directory without its config and weights. A no-op in one process."""
    if _active() and dist.get_rank() != 0:
        dist.barrier()
    yield
    if _active() and dist.get_rank() == 0:
        dist.barrier()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if _active():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def sum_floats(values: list[float]) -> list[float]:
    return all_reduce_(torch.tensor(values, dtype=torch.float64)).tolist()


def max_int(value: int) -> int:
    return int(all_reduce_(torch.tensor([value], dtype=torch.long), "max").item())


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank (picklable items)."""
    if not _active():
        return items
    parts: list[list] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_grads_(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks in one flat buffer (losses are already normalised globally)."""
    if not _active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


SUMMED = ("loss/", "mtp/ce", "mtp/accept")  # each rank reports its share of a globally normalised mean


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average every metric over the ranks that report it; losses (`SUMMED`) add up instead."""
    if not _active():
        return metrics
    key_lists: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(key_lists, sorted(metrics))
    keys = sorted(set().union(*key_lists))
    sums = sum_floats([float(metrics.get(k, 0.0)) for k in keys])
    counts = sum_floats([float(k in metrics) for k in keys])
    return {k: s if k.startswith(SUMMED) else s / c for k, s, c in zip(keys, sums, counts, strict=True)}
