"""Batch-independent sampling: each sample depends only on (seed, its row key, position), never on which
other rows share the batch, how prompts are padded, or how many ranks split the batch.

Sampling is the Gumbel-max trick, argmax(logits/T + G) with G = −log(−log U), where U comes from a
counter-based hash (splitmix64) of (seed, row key, decode position, token id) instead of a stateful RNG.
Applied as a logits processor under greedy decoding, it draws exactly from softmax(logits/T) (after top-k /
top-p filtering). That is what lets a 2-process run reproduce a 1-process run sample for sample, and a
resumed run regenerate its rollouts, while staying a single batched `generate` call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How one `generate` call samples, shared by every backend: training rollouts take them from
    `RolloutConfig` (`for_rollouts`), evaluation from `EvalConfig` with the rollout's prompt length and
    batching (`for_eval`). `temperature=0` decodes greedily; `top_k=0` is off; `batch_size=0` generates
    all sequences in one call."""

    temperature: float
    max_new_tokens: int
    max_prompt_len: int
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 0

    @classmethod
    def for_rollouts(cls, r) -> SamplingSettings:
        """From a `RolloutConfig`."""
        return cls(temperature=r.temperature, max_new_tokens=r.max_new_tokens, max_prompt_len=r.max_prompt_len,
                   top_p=r.top_p, top_k=r.top_k, batch_size=r.batch_size)

    @classmethod
    def for_eval(cls, e, r) -> SamplingSettings:
        """From an `EvalConfig` (no top-k at evaluation) and the `RolloutConfig`'s prompt length/batching."""
        return cls(temperature=e.temperature, max_new_tokens=e.max_new_tokens, max_prompt_len=r.max_prompt_len,
                   top_p=e.top_p, batch_size=r.batch_size)

_M64 = (1 << 64) - 1


def _to_i64(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN, _MIX1, _MIX2 = _to_i64(0x9E3779B97F4A7C15), _to_i64(0xBF58476D1CE4E5B9), _to_i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift on int64 (torch shifts arithmetically)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def uniform_BV(seed: int, row_keys_B: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """U(0,1) in float64, shape [B, V], a pure function of (seed, row key, position, token id)."""
    base_B = splitmix64(splitmix64(row_keys_B.long() ^ _to_i64(seed * 0x2545F4914F6CDD1D)) + position)
    x_BV = splitmix64(base_B.unsqueeze(1) + torch.arange(vocab, device=row_keys_B.device).unsqueeze(0) * _GOLDEN)
    return (_srl(x_BV, 11).double() + 0.5) / float(1 << 53)


def filter_top_k_top_p(scores_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set tokens outside the top-k / nucleus to −inf (always keeping the most likely one)."""
    if top_k and top_k < scores_BV.shape[-1]:
        kth = torch.topk(scores_BV, top_k, dim=-1).values[..., -1:]
        scores_BV = scores_BV.masked_fill(scores_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(scores_BV, descending=True, dim=-1)
        probs_BV = sorted_BV.softmax(-1)
        drop_BV = (probs_BV.cumsum(-1) - probs_BV) > top_p
        scores_BV = scores_BV.masked_fill(drop_BV.scatter(-1, idx_BV, drop_BV), float("-inf"))
    return scores_BV


class GumbelSampler:
    """A `generate` logits processor: under greedy decoding it samples from softmax(logits/T)."""

    def __init__(self, row_keys_B: torch.Tensor, prompt_len: int, seed: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0):
        self.row_keys_B, self.prompt_len, self.seed = row_keys_B, prompt_len, seed
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids_BT: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        scores_BV = filter_top_k_top_p(scores_BV.float() / self.temperature, self.top_k, self.top_p)
        u_BV = uniform_BV(self.seed, self.row_keys_B.to(scores_BV.device), input_ids_BT.shape[1] - self.prompt_len,
                          scores_BV.shape[-1])
        return scores_BV - torch.log(-torch.log(u_BV)).to(scores_BV.dtype)
