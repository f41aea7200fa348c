"""vLLM rollout backend (GPU only): a colocated engine that sleeps while the trainer trains.

Life cycle per RL step: `wake()` -> `sync_weights(model)` (the policy, and with speculative decoding the MTP
drafter) -> `generate(...)` -> `sleep()` (level 1: weights offloaded, KV cache freed, so training gets the
GPU back). The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so weights are handed over as
tensors, not serialised; with several training ranks every rank runs its own engine on its own GPU
(`distributed_executor_backend="external_launcher"`, tensor parallel 1, as TRL's colocate mode does).

- Weight sync: the trainer's parameters are streamed, one at a time, into the worker's `load_weights`
  under the HF names (vLLM maps and fuses them, q/k/v -> qkv etc.) through vLLM's `collective_rpc`.
  Under ZeRO-3 each parameter is gathered from its shards just before it is handed over
  (`full_named_parameters`: a collective, so every rank syncs, in the same order).
- MTP speculative decoding (`rollout.speculative_mtp=true`, MiMo-layout checkpoints): vLLM's MTP drafter
  reads MiMo names (`model.mtp_layers.{i}.*`, plus the shared embedding and LM head); they are synced
  every step too, otherwise acceptance silently decays as the policy moves. `rollout/spec_acceptance`
  (accepted / proposed draft tokens during this step's generation) comes from vLLM's own counters.
- Log-probs: the engine reports *processed* log-probs (`logprobs_mode="processed_logprobs"`: after
  temperature, top-k/top-p), i.e. the distribution the tokens were actually drawn from; vLLM's default
  (raw, before temperature) would differ from the trainer's temperature-scaled log-probs whenever T != 1.
  `rollout/logprob_mismatch` is mean |log π_trainer − log π_vllm| over response tokens; with
  `rollout.tis_cap > 0` the policy loss is reweighted per token by min(π_trainer / π_vllm, cap)
  (truncated importance sampling).
- Sampling is vLLM's own (seeded per request from the row keys), so DP/resume reproducibility holds per
  request, not bitwise against the HF backend.

Imported lazily; `rollout=vllm` on a machine without CUDA fails before any model is built. Everything but
the engine itself (layout of the returned batch, weight naming, ZeRO-3 gathering, acceptance counters) is
tested on CPU against a stand-in engine (`tests/test_vllm_backend.py`); `tests/gpu/` checks the real one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mtp_occ.rollout.hf import RolloutBatch, assemble_batch, encode_prompts

SPEC_COUNTERS = ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("rollout=vllm needs a CUDA GPU (none visible here); use rollout=hf on CPU machines")


def full_named_parameters(module: nn.Module, names: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter (only those in `names` when given). ZeRO-3-partitioned
    parameters (they carry `ds_id`) are gathered one at a time and handed over as a copy, so peak memory
    grows by one parameter; the gather is a collective, so all ranks must iterate the same module together."""
    for name, p in module.named_parameters():
        if names and name not in names:
            continue
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.data.detach().clone()
            yield name, full
        else:
            yield name, p.detach()


def mtp_weights_for_drafter(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The MTP layers under vLLM's MiMo drafter names, and the embedding / LM head it shares with the policy
    (loaded into the drafter too, in case the engine keeps its own copy rather than sharing the tensor)."""
    from mtp_occ.model.load import ours_to_mimo_key

    for name, t in full_named_parameters(model.mtp):
        yield ours_to_mimo_key(name), t
    yield from full_named_parameters(model.lm, ("model.embed_tokens.weight", "lm_head.weight"))


def on_worker(llm, fn: Callable):
    """fn(model_runner) inside the engine's (in-process) worker, through vLLM's `collective_rpc`."""
    def call(worker):
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return fn(runner)

    return llm.collective_rpc(call)[0]


class VllmRollout:
    """A started vLLM `LLM` (see `start`) with the trainer-facing operations."""

    def __init__(self, llm, speculative: bool):
        self.llm, self.speculative, self.awake = llm, speculative, True
        self._spec_seen = self.spec_counters()

    @classmethod
    def start(cls, model_path: str, *, dtype: str, gpu_memory_utilization: float, max_model_len: int,
              speculative_mtp: bool, seed: int, trust_remote_code: bool = False) -> VllmRollout:
        require_cuda()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        multi_rank = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                  max_model_len=max_model_len, enable_sleep_mode=True, seed=seed, enable_prefix_caching=False,
                  trust_remote_code=trust_remote_code, logprobs_mode="processed_logprobs",
                  speculative_config={"method": "mtp", "num_speculative_tokens": 1} if speculative_mtp else None,
                  disable_log_stats=not speculative_mtp, tensor_parallel_size=1,
                  distributed_executor_backend="external_launcher" if multi_rank else None)
        return cls(llm, speculative_mtp)

    def sleep(self) -> None:
        if self.awake:
            self.llm.sleep(level=1)
            self.awake = False

    def wake(self) -> None:
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Push the trainer's policy (and, with speculative decoding, its MTP layers) into the engine."""
        on_worker(self.llm, lambda runner: runner.model.load_weights(full_named_parameters(model.lm)))
        if self.speculative:
            def load_drafter(runner):
                drafter = getattr(runner, "drafter", None)
                if drafter is None or not hasattr(drafter, "model"):
                    raise RuntimeError("vLLM was started without an MTP drafter (rollout.speculative_mtp=false?)")
                return drafter.model.load_weights(mtp_weights_for_drafter(model))

            on_worker(self.llm, load_drafter)

    def spec_counters(self) -> dict[str, float]:
        """vLLM's cumulative draft/accepted token counters ({} without speculative decoding)."""
        if not self.speculative:
            return {}
        out = dict.fromkeys(SPEC_COUNTERS, 0.0)
        for m in self.llm.get_metrics():
            name = m.name.removesuffix("_total")
            if name in out:
                out[name] = float(m.value)
        return out

    def metrics(self) -> dict[str, float]:
        """Per-step engine metrics: the draft acceptance rate since the last call."""
        if not self.speculative:
            return {}
        now = self.spec_counters()
        proposed, accepted = (now[k] - self._spec_seen[k] for k in SPEC_COUNTERS)
        self._spec_seen = now
        return {"rollout/spec_acceptance": accepted / proposed} if proposed > 0 else {}

    def generate(self, tokenizer, prompts: list[str], n: int, *, temperature: float, top_p: float, top_k: int,
                 max_new_tokens: int, max_prompt_len: int, row_keys: torch.Tensor, seed: int,
                 add_special_tokens: bool = True) -> tuple[RolloutBatch, torch.Tensor]:
        """(batch, vllm_logprob_BT) with the same layout as the HF backend; log-probs are
        prediction-aligned like the trainer's (index t scores token t+1)."""
        from vllm import SamplingParams, TokensPrompt

        ids_P, attn_P, cut = encode_prompts(tokenizer, prompts, max_prompt_len, add_special_tokens)
        requests, params = [], []
        for i in range(len(prompts)):
            toks = ids_P[i][attn_P[i].bool()].tolist()
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=toks))
                params.append(SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                             max_tokens=max_new_tokens, logprobs=0,
                                             seed=(int(row_keys[i * n + j]) ^ seed) & 0x7FFFFFFF))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        R = max(max(len(o.outputs[0].token_ids) for o in outs), 1)
        gen = torch.full((len(outs), R), tokenizer.pad_token_id, dtype=torch.long)
        lp = torch.zeros(len(outs), R)
        for b, o in enumerate(outs):
            toks = list(o.outputs[0].token_ids)
            gen[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            for t, (tok, d) in enumerate(zip(toks, o.outputs[0].logprobs or [], strict=False)):
                lp[b, t] = d[tok].logprob
        len_B = torch.tensor([len(o.outputs[0].token_ids) for o in outs])
        batch = assemble_batch(tokenizer, ids_P.repeat_interleave(n, 0), attn_P.repeat_interleave(n, 0), gen, n,
                               cut, len_B)
        P = ids_P.shape[1]
        vllm_lp_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        vllm_lp_BT[:, P - 1:P - 1 + R] = lp * batch.response_mask_BT[:, P:]  # index t scores token t+1
        return batch, vllm_lp_BT


def logprob_mismatch(old_BT: torch.Tensor, vllm_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean |log π_trainer − log π_vllm| over response tokens."""
    m = mask_BT.float()
    return float(((old_BT.float() - vllm_BT.float()).abs() * m).sum() / m.sum().clamp(min=1.0))


def tis_weights_BT(old_BT: torch.Tensor, vllm_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(π_trainer / π_vllm, cap) per token (no gradient)."""
    return torch.exp(old_BT.float() - vllm_BT.float()).clamp(max=cap).detach()
