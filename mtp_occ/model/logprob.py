"""Token log-probs of the output head without a [B,T,V] logits tensor.

`head_logprob_BT` projects only the positions whose log-prob a loss uses (a mask: response targets for the
main head, the CE mask for an MTP depth), in chunks of tokens, through `ChunkedTokenLogprob`, an autograd
function that keeps only the hidden states and one log-sum-exp per token and *recomputes* each chunk's
logits in backward. Peak memory is one chunk of float32 logits (`chunk_tokens`), at any temperature; the
head's weight gets a gradient only when it requires one (a detached weight, `grad_path.lm_head=false`,
gets none). Results equal the dense reference (`token_logprob_BT` on `F.linear` over every position, what
the model computed before) to float32 round-off, gradients included (tests/test_logprob.py).

Departures from peers: verl computes `logprobs_from_logits` on the full logits of the response slice
(optionally flash-attn's fused cross-entropy kernel) and chunks only its entropy
(`entropy_from_logits_with_chunking`); Liger's fused linear cross-entropy chunks the head projection as
here but returns one reduced loss. The policy loss needs a log-prob *per token*, so this returns them per
token and leaves the reduction to `mtp_occ.rl.grpo`. The chunk is sized in MB of float32 logits
(`algo.logprob_chunk_mb`), not tokens, so a small vocabulary runs in one chunk (no loop overhead on the
embedded task) and a 151,680-token vocabulary in ~110 tokens per chunk at the default 64 MB. The weight's
gradient is accumulated over chunks in float32 and cast once. No entropy is computed anywhere (no entropy
bonus, DESIGN §1.4); an entropy would need the same chunking.

ZeRO-3: the head weight is partitioned and whole only while a module that owns or registered it runs.
The engine registers it as an external parameter of `MTPModel`, whose forward computes these log-probs,
and `MTPOutput` is a NamedTuple, so ZeRO-3's pre-backward hook on the model's outputs gathers it again
before this backward recomputes a chunk (the schedule DeepSpeed's own `LinearFunctionForZeroStage3`
relies on); the full-shape weight gradient is then reduce-scattered by ZeRO-3's gradient hook as any
other. A released weight in backward is an error, not a silent wrong recompute. A head whose weight must
get no gradient (`grad_path.lm_head=false`) is passed as the parameter itself with `weight_grad=False`,
not as a detached view, which would hold a second reference to the whole gathered [V,D] tensor.

Shapes: B sequences, T tokens, V vocab, D hidden width, N selected tokens, C tokens in one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

DENSE = 0.0  # `chunk_mb` value that selects the dense reference path


def token_logprob_BT(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The dense reference: log softmax(logits / temperature)[target] in float32 over every position."""
    logits_BTV = logits_BTV.float()
    if temperature != 1.0:
        logits_BTV = logits_BTV / temperature
    picked_BT = logits_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)
    return picked_BT - torch.logsumexp(logits_BTV, dim=-1)


def chunk_tokens(chunk_mb: float, vocab: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits take `chunk_mb` MB (1 MB = 1e6 bytes), at least 1."""
    return max(1, int(chunk_mb * 1e6 // (4 * vocab)))


def _chunk_logits_CV(hidden_CD, weight_VD, bias_V, temperature: float) -> torch.Tensor:
    """float32 logits / temperature of one chunk, computed in the head's dtype as `nn.Linear` would."""
    logits_CV = F.linear(hidden_CD, weight_VD, bias_V).float()
    return logits_CV.div_(temperature) if temperature != 1.0 else logits_CV


def _check_whole(weight_VD: torch.Tensor) -> None:
    """Backward recomputes logits from the weight: under ZeRO-3 it must be gathered (see the module
    docstring) or the recompute would read an empty partition."""
    if hasattr(weight_VD, "ds_id") and weight_VD.ds_status.name == "NOT_AVAILABLE":
        raise RuntimeError("the chunked log-prob backward found the ZeRO-3 head weight released: the model must "
                           "register it as an external parameter and return its outputs in a tuple, list or "
                           "dict, so that ZeRO-3's pre-backward hook gathers it (see mtp_occ.model.MTPOutput)")


class ChunkedTokenLogprob(torch.autograd.Function):
    """logprob_N = log softmax(hidden_ND · Wᵀ + b)/τ [targets_N], chunk by chunk; backward recomputes the
    chunk's logits: d logp_n / d logit_nv = (1[v = target_n] − softmax_nv) / τ. `weight_grad=False`: the
    weight and bias get no gradient even when they require one (a head detached from this loss). The second
    output, `hit_N` (not differentiable), is True where the target is the head's argmax (a tie counts as
    a hit), read off the chunk's max that the log-sum-exp needs anyway."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, bias_V, targets_N, temperature: float, chunk: int,
                weight_grad: bool = True):
        N = hidden_ND.shape[0]
        logprob_N = torch.empty(N, dtype=torch.float32, device=hidden_ND.device)
        lse_N = torch.empty_like(logprob_N)
        hit_N = torch.empty(N, dtype=torch.bool, device=hidden_ND.device)
        for s in range(0, N, chunk):
            logits_CV = _chunk_logits_CV(hidden_ND[s:s + chunk], weight_VD, bias_V, temperature)
            picked_C = logits_CV.gather(-1, targets_N[s:s + chunk, None]).squeeze(-1)
            max_C = logits_CV.amax(-1)
            hit_N[s:s + chunk] = picked_C >= max_C
            # log-sum-exp in place: the chunk's logits are the only [C,V] buffer alive
            sum_C = logits_CV.sub_(max_C[:, None]).exp_().sum(-1)
            lse_N[s:s + chunk] = max_C + sum_C.log()
            logprob_N[s:s + chunk] = picked_C - lse_N[s:s + chunk]
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, targets_N, lse_N)
        ctx.temperature, ctx.chunk, ctx.weight_grad = temperature, chunk, weight_grad
        ctx.mark_non_differentiable(hit_N)
        return logprob_N, hit_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_N, _grad_hit):
        hidden_ND, weight_VD, bias_V, targets_N, lse_N = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want_w, want_b = want_w and ctx.weight_grad, want_b and ctx.weight_grad
        _check_whole(weight_VD)
        grads = ChunkedTokenLogprob._backward(ctx, grad_N, hidden_ND, weight_VD, bias_V, targets_N, lse_N,
                                              want_h, want_w, want_b)
        return (*grads, None, None, None, None)

    @staticmethod
    def _backward(ctx, grad_N, hidden_ND, weight_VD, bias_V, targets_N, lse_N, want_h, want_w, want_b):
        grad_h = torch.empty_like(hidden_ND) if want_h else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if want_w else None
        # a head in bf16/fp16: each chunk's [V,D] product lands in one buffer of the head's dtype, allocated
        # once, and is added into the float32 accumulator in place (the same numbers as `(dᵀ h).float()` per
        # chunk, without a [V,D] product and its float32 copy allocated for every chunk)
        prod_VD = torch.empty_like(weight_VD) if want_w and weight_VD.dtype != torch.float32 else None
        grad_b = torch.zeros(bias_V.shape, dtype=torch.float32, device=bias_V.device) if want_b else None
        tau, chunk = ctx.temperature, ctx.chunk
        for s in range(0, hidden_ND.shape[0], chunk):
            h_CD, g_C = hidden_ND[s:s + chunk], grad_N[s:s + chunk].float()
            p_CV = _chunk_logits_CV(h_CD, weight_VD, bias_V, tau).sub_(lse_N[s:s + chunk, None]).exp_()
            d_CV = p_CV.mul_(-g_C[:, None]).scatter_add_(-1, targets_N[s:s + chunk, None], g_C[:, None])
            if tau != 1.0:
                d_CV.div_(tau)
            d_CV = d_CV.to(weight_VD.dtype)  # the matmuls run in the head's dtype, as nn.Linear's backward does
            if want_h:
                grad_h[s:s + chunk] = d_CV @ weight_VD
            if want_w and prod_VD is None:  # float32: accumulate in place
                grad_w.addmm_(d_CV.t(), h_CD)
            elif want_w:
                grad_w.add_(torch.mm(d_CV.t(), h_CD, out=prod_VD))
            if want_b:
                grad_b += d_CV.float().sum(0)
        del prod_VD  # freed before the cast: at most one [V,D] tensor in the head's dtype beside the accumulator
        grad_w = None if grad_w is None else grad_w.to(weight_VD.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias_V.dtype)
        return grad_h, grad_w, grad_b


def head_logprob_BT(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None,
                    targets_BT: torch.Tensor, mask_BT: torch.Tensor, temperature: float = 1.0,
                    chunk_mb: float = 64.0, shift: int = 0, weight_grad: bool = True, return_hit: bool = False
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out_BT[b, t] = log p(targets_BT[b, t] | hidden_BTD[b, t − shift]) where `mask_BT`, else 0 (no gradient).

    `shift=k` reads depth k's hidden state k positions earlier (the MTP alignment: its raw prediction at
    t−k scores x_{t+1}); `mask_BT` must be False where t − shift < 0. `chunk_mb=DENSE` (0) runs the dense
    reference over every position (the bench's and the tests' "old" path). `weight_grad=False`: no gradient
    reaches the weight and bias (the head is detached from this term) while the hidden states still get one.
    `return_hit`: also `hit_BT`, True where the target is the head's argmax (False off the mask)."""
    mask_BT = mask_BT.bool()
    b_N, t_N = mask_BT.nonzero(as_tuple=True)
    if chunk_mb == DENSE:
        if not weight_grad:
            weight_VD, bias_V = weight_VD.detach(), None if bias_V is None else bias_V.detach()
        logits_BTV, aligned_BT = F.linear(hidden_BTD, weight_VD, bias_V), targets_BT.roll(-shift, 1)
        picked_N = token_logprob_BT(logits_BTV, aligned_BT, temperature)[b_N, t_N - shift]
        if return_hit:
            with torch.no_grad():
                hit_BT = logits_BTV.gather(-1, aligned_BT.unsqueeze(-1)).squeeze(-1) >= logits_BTV.amax(-1)
                hit_N = hit_BT[b_N, t_N - shift]
    else:
        chunk = chunk_tokens(chunk_mb, weight_VD.shape[0])
        picked_N, hit_N = ChunkedTokenLogprob.apply(hidden_BTD[b_N, t_N - shift], weight_VD, bias_V,
                                                    targets_BT[b_N, t_N], temperature, chunk, weight_grad)
    out_BT = torch.zeros(mask_BT.shape, dtype=picked_N.dtype, device=picked_N.device).masked_scatter(mask_BT, picked_N)
    if not return_hit:
        return out_BT
    return out_BT, torch.zeros_like(mask_BT).masked_scatter(mask_BT, hit_N.detach())
