"""vLLM rollout backend (GPU only): a colocated engine that sleeps while the trainer trains.

Life cycle per RL step: `wake()` -> `sync_weights(model)` (the policy, and with speculative decoding the MTP
drafter) -> `generate(...)` -> `sleep()` (level 1: weights offloaded, KV cache freed, so training gets the
GPU back). The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so weights are handed over as
tensors, not serialised.

- Weight sync: the trainer's state dict is streamed into vLLM's `load_weights` under the HF names (vLLM
  maps and fuses them, q/k/v -> qkv etc.). Under ZeRO-3 the caller gathers the parameters first.
- MTP speculative decoding (`rollout.speculative_mtp=true`): vLLM's MTP drafter reads MiMo-layout weights
  (`model.mtp_layers.{i}.*`); they are synced every step too, otherwise acceptance silently decays to 0
  as the policy moves. `rollout/spec_acceptance` is logged from vLLM's metrics when available.
- Log-prob mismatch: vLLM's sampled-token log-probs are compared with the trainer's recomputed old
  log-probs (`rollout/logprob_mismatch`, mean |Δ| over response tokens). With `rollout.tis_cap > 0` the
  policy loss is reweighted per token by min(exp(logp_old − logp_vllm), cap) (truncated importance
  sampling), correcting for sampling from vLLM's slightly different distribution.
- Sampling is vLLM's own (seeded per request from the same row keys), so DP/resume reproducibility is
  per-request, not bitwise identical to the HF backend.

Imported lazily: `rollout=vllm` on a machine without CUDA fails before any model is built.
"""

from __future__ import annotations

import os

import torch

from mtp_occ.rollout.hf import RolloutBatch, encode_prompts, response_mask_after_eos


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("rollout=vllm needs a CUDA GPU (none visible here); use rollout=hf on CPU machines")


def _inner_model(llm, drafter: bool = False):
    """The in-process torch model (or its MTP drafter) behind a vLLM `LLM`, across engine versions."""
    executor = llm.llm_engine.model_executor
    worker = getattr(executor, "driver_worker", None)
    worker = getattr(worker, "worker", worker)
    runner = worker.model_runner
    if drafter:
        proposer = getattr(runner, "drafter", None)
        if proposer is None or not hasattr(proposer, "model"):
            raise RuntimeError("vLLM was started without an MTP drafter (rollout.speculative_mtp=false?)")
        return proposer.model
    return runner.model


class VllmRollout:
    def __init__(self, model_path: str, *, dtype: str, gpu_memory_utilization: float, max_model_len: int,
                 speculative_mtp: bool, seed: int, trust_remote_code: bool = False):
        require_cuda()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        spec = {"method": "mtp", "num_speculative_tokens": 1} if speculative_mtp else None
        self.speculative = speculative_mtp
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, enable_sleep_mode=True, seed=seed, enable_prefix_caching=False,
                       trust_remote_code=trust_remote_code, speculative_config=spec)
        self.awake = True

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
        """Push the trainer's policy (and MTP layers into the drafter) into the engine."""
        from mtp_occ.model.load import ours_to_mimo_key

        _inner_model(self.llm).load_weights((k, v) for k, v in model.lm.state_dict().items())
        if self.speculative:
            mtp = ((ours_to_mimo_key(k), v) for k, v in model.mtp.state_dict().items())
            _inner_model(self.llm, drafter=True).load_weights(mtp)

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
                                             seed=int(row_keys[i * n + j]) ^ seed))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        R = max(max(len(o.outputs[0].token_ids) for o in outs), 1)
        gen = torch.full((len(outs), R), tokenizer.pad_token_id, dtype=torch.long)
        lp = torch.zeros(len(outs), R)
        for b, o in enumerate(outs):
            toks = list(o.outputs[0].token_ids)
            gen[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            for t, (tok, d) in enumerate(zip(toks, o.outputs[0].logprobs or [], strict=False)):
                lp[b, t] = d[tok].logprob
        resp, truncated = response_mask_after_eos(gen, tokenizer.eos_token_id)
        gen = gen.masked_fill(resp == 0, tokenizer.pad_token_id)
        ids = ids_P.repeat_interleave(n, 0)
        attn = attn_P.repeat_interleave(n, 0)
        P = ids.shape[1]
        batch = RolloutBatch(torch.cat([ids, gen], 1), torch.cat([attn, resp], 1),
                             torch.cat([torch.zeros_like(attn), resp], 1), resp.sum(1), truncated,
                             torch.arange(len(prompts)).repeat_interleave(n),
                             tokenizer.batch_decode(gen, skip_special_tokens=True), cut)
        vllm_lp_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        vllm_lp_BT[:, P - 1:P - 1 + R] = lp * resp  # index t scores token t+1
        return batch, vllm_lp_BT


def logprob_mismatch(old_BT: torch.Tensor, vllm_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean |log π_trainer − log π_vllm| over response tokens."""
    m = mask_BT.float()
    return float(((old_BT.float() - vllm_BT.float()).abs() * m).sum() / m.sum().clamp(min=1.0))


def tis_weights_BT(old_BT: torch.Tensor, vllm_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(π_trainer / π_vllm, cap) per token (no gradient)."""
    return torch.exp(old_BT.float() - vllm_BT.float()).clamp(max=cap).detach()
