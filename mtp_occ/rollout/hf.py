"""Reference rollout backend: batched HF `generate` with KV cache (runs anywhere, CPU included).

Prompts are left-padded; each prompt is repeated `n` times consecutively so that rows [g·n, (g+1)·n)
form GRPO group g. The response is everything after the prompt up to and including the first EOS;
later positions are padding. Old log-probs are *not* taken from `generate`: the trainer recomputes them
with its own forward (same kernels as the update), which is what the importance ratio needs.

Sampling goes through `GumbelSampler` (see `sampling.py`): every sample is a pure function of (seed, its
row key, position), so a resumed run regenerates exactly the same rollouts and a data-parallel run
draws the same samples as a single process. Row keys default to the row index; the trainer passes
global keys (prompt index × n + sample index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_occ.rollout.sampling import SamplingSettings


@dataclass
class RolloutBatch:
    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    response_mask_BT: torch.Tensor  # input-aligned: 1 on generated tokens (EOS included)
    response_len_B: torch.Tensor
    truncated_B: torch.Tensor  # True where no EOS was produced within max_new_tokens
    prompt_idx_B: torch.Tensor  # which prompt (0..P-1) each row belongs to
    completions: list[str]  # decoded responses (special tokens skipped)
    prompt_truncated: int  # prompts cut to max_prompt_len (counted, logged)
    token_weight_BT: torch.Tensor | None = None  # per-token loss weights (vLLM truncated IS), else None
    rollout_logprob_BT: torch.Tensor | None = None  # the sampler's own log-probs (vLLM), prediction-aligned
    # depth 1's MTP log-probs at the rollout weights (OCC's `own_displacement` estimator), aligned as the model's
    old_mtp_logprob_BT: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The rows `rows` (an index tensor), trailing all-padding columns kept (shapes stay static)."""
        idx = rows.tolist()
        return RolloutBatch(self.input_ids_BT[rows], self.attention_mask_BT[rows], self.response_mask_BT[rows],
                            self.response_len_B[rows], self.truncated_B[rows], self.prompt_idx_B[rows],
                            [self.completions[i] for i in idx], self.prompt_truncated,
                            *(None if t is None else t[rows] for t in (self.token_weight_BT, self.rollout_logprob_BT,
                                                                       self.old_mtp_logprob_BT)))


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int, add_special_tokens: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded prompt ids and mask; over-long prompts keep their last `max_prompt_len` tokens."""
    rows = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    cut = sum(len(r) > max_prompt_len for r in rows)
    rows = [r[-max_prompt_len:] for r in rows]
    P = max(map(len, rows))
    ids = torch.full((len(rows), P), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros(len(rows), P, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], attn[i, P - len(r):] = torch.tensor(r), 1
    return ids, attn, cut


def response_mask_after_eos(gen_BR: torch.Tensor, eos_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask_BR, truncated_B): 1 up to and including the first EOS; truncated where no EOS appears."""
    eos_ids = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=gen_BR.device)
    is_eos_BR = torch.isin(gen_BR, eos_ids)
    seen_before_BR = (is_eos_BR.long().cumsum(-1) - is_eos_BR.long()) > 0
    return (~seen_before_BR).long(), ~is_eos_BR.any(-1)


@torch.no_grad()
def generate(lm, tokenizer, prompts: list[str], n: int, sampling: SamplingSettings, *, seed: int = 0,
             add_special_tokens: bool = True, row_keys: torch.Tensor | None = None,
             synced_gpus: bool = False) -> RolloutBatch:
    """`n` samples for each prompt (consecutive rows) with `sampling` (`temperature=0` decodes greedily).
    `add_special_tokens` as `Template.add_special_tokens` decides; `row_keys` (one int per
    output row) decide each row's random stream. `synced_gpus` keeps every rank stepping until all are done
    (needed under ZeRO-3, where each forward gathers parameters from all ranks)."""
    from transformers import LogitsProcessorList

    from mtp_occ.rollout.sampling import GumbelSampler

    sp = sampling
    ids_P, attn_P, cut = encode_prompts(tokenizer, prompts, sp.max_prompt_len, add_special_tokens)
    ids = ids_P.repeat_interleave(n, 0).to(lm.device)
    attn = attn_P.repeat_interleave(n, 0).to(lm.device)
    keys = torch.arange(ids.shape[0]) if row_keys is None else row_keys
    gen_kw = dict(max_new_tokens=sp.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, use_cache=True, do_sample=False, temperature=None,
                  top_p=None, top_k=None, synced_gpus=synced_gpus)
    step = sp.batch_size or ids.shape[0]
    outs = []
    was_training = lm.training
    lm.eval()
    for s in range(0, ids.shape[0], step):
        procs = LogitsProcessorList()
        if sp.temperature > 0:
            procs.append(GumbelSampler(keys[s:s + step], ids.shape[1], seed, sp.temperature, sp.top_p, sp.top_k))
        outs.append(lm.generate(input_ids=ids[s:s + step], attention_mask=attn[s:s + step], logits_processor=procs,
                                **gen_kw))
    lm.train(was_training)
    P = ids.shape[1]
    R = max(o.shape[1] for o in outs) - P
    gen = torch.full((ids.shape[0], R), tokenizer.pad_token_id, dtype=torch.long, device=ids.device)
    row = 0
    for o in outs:
        gen[row:row + o.shape[0], : o.shape[1] - P] = o[:, P:]
        row += o.shape[0]
    return assemble_batch(tokenizer, ids, attn, gen, n, cut)


def assemble_batch(tokenizer, ids_BP: torch.Tensor, attn_BP: torch.Tensor, gen_BR: torch.Tensor, n: int, cut: int,
                   len_B: torch.Tensor | None = None) -> RolloutBatch:
    """Prompts (left-padded, each repeated `n` times) + generated tokens -> `RolloutBatch`. A response runs
    up to and including its first EOS (and within its first `len_B` tokens when given: rows an engine
    stopped early); every later position becomes padding."""
    resp_BR, truncated_B = response_mask_after_eos(gen_BR, tokenizer.eos_token_id)
    if len_B is not None:
        resp_BR = resp_BR * (torch.arange(gen_BR.shape[1], device=gen_BR.device)[None] < len_B[:, None])
    gen_BR = gen_BR.masked_fill(resp_BR == 0, tokenizer.pad_token_id)
    return RolloutBatch(
        input_ids_BT=torch.cat([ids_BP, gen_BR], 1), attention_mask_BT=torch.cat([attn_BP, resp_BR], 1),
        response_mask_BT=torch.cat([torch.zeros_like(attn_BP), resp_BR], 1), response_len_B=resp_BR.sum(1),
        truncated_B=truncated_B, prompt_idx_B=torch.arange(ids_BP.shape[0] // n).repeat_interleave(n),
        completions=tokenizer.batch_decode(gen_BR, skip_special_tokens=True), prompt_truncated=cut)


def concat_batches(batches: list[RolloutBatch], pad_id: int = 0) -> RolloutBatch:
    """Stack batches row-wise, right-padding shorter ones (positions come from the attention mask, so
    a row's padding may sit on either side)."""
    if len(batches) == 1:
        return batches[0]
    T = max(b.input_ids_BT.shape[1] for b in batches)

    def pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)

    return RolloutBatch(
        input_ids_BT=torch.cat([pad(b.input_ids_BT, pad_id) for b in batches]),
        attention_mask_BT=torch.cat([pad(b.attention_mask_BT, 0) for b in batches]),
        response_mask_BT=torch.cat([pad(b.response_mask_BT, 0) for b in batches]),
        response_len_B=torch.cat([b.response_len_B for b in batches]),
        truncated_B=torch.cat([b.truncated_B for b in batches]),
        prompt_idx_B=torch.cat([b.prompt_idx_B for b in batches]),
        completions=[c for b in batches for c in b.completions],
        prompt_truncated=sum(b.prompt_truncated for b in batches),
        token_weight_BT=None if batches[0].token_weight_BT is None else torch.cat(
            [pad(b.token_weight_BT, 1) for b in batches]),
        rollout_logprob_BT=None if batches[0].rollout_logprob_BT is None else torch.cat(
            [pad(b.rollout_logprob_BT, 0) for b in batches]))
