"""Padding removal: the real tokens of a micro-batch packed into one row with per-sequence position ids.

    ids_1N, resp_1N, pos_1N = pack_rows(attention_mask_BT, input_ids_BT, response_mask_BT)
    out = model(ids_1N, ones, resp_1N, position_ids_BT=pos_1N)       # attention mask ignored when packed
    logprob_BT = unpack_rows(out.logprob_BT, attention_mask_BT)       # back to the padded layout, zeros elsewhere

As verl's `use_remove_padding`, the row is the concatenation of every sequence's real tokens, and the
attention implementation keeps sequences apart from the positions alone: HF's flash-attention path turns
restarting position ids into varlen `cu_seqlens` (GPU), and its eager/sdpa path builds a block-diagonal
causal mask from them (`masking_utils.find_packed_sequence_indices`; runs on CPU, tested packed == padded).
On CPU that mask is dense N×N, so packing saves the padded tokens' compute in every linear layer but not
in attention; the block-sparse saving is flash-attention's (GPU-only, not exercised by the CPU tests).
verl unpads inside the model with `index_first_axis`; here the model is HF's, so packing happens on the
inputs and the padded layout is restored on the per-token outputs, which the losses read unchanged.

Boundaries: `packed_aligned_masks` derives the aligned masks from the positions (a position p ≥ k means the
k tokens before it are the same sequence's), so no MTP input, label or aligned log-prob ever crosses from
one sequence into the next; the MTP layer's inputs at a sequence's last k positions do read the next
sequence's first tokens, but those positions are masked and no used position attends to them (they come
after every used position of their own sequence, and the mask keeps other sequences out).
"""

from __future__ import annotations

import torch

# attention implementations whose HF path separates packed sequences by their position ids
PACKING_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


def pack_rows(attention_mask_BT: torch.Tensor, *x_BT: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(x_1N for each x_BT..., position_ids_1N): the real tokens row by row (real tokens of a row must be
    contiguous, as left- or right-padded rollouts are), positions restarting at 0 for every sequence."""
    real_BT = attention_mask_BT.bool()
    pos_BT = real_BT.long().cumsum(-1) - 1
    return (*(x[real_BT][None] for x in x_BT), pos_BT[real_BT][None])


def unpack_rows(x_1N: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_rows` for one per-token output: x_BT with zeros (False) at padding; differentiable."""
    real_BT = attention_mask_BT.bool()
    return torch.zeros(real_BT.shape, dtype=x_1N.dtype, device=x_1N.device).masked_scatter(real_BT, x_1N[0])


def packed_aligned_masks(position_ids_BT: torch.Tensor, response_mask_BT: torch.Tensor, depth: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mtp_occ.model.mtp.aligned_masks` for packed rows (every token real, sequences told apart by their
    positions): loss[t] = resp[t+1] ∧ t+1 continues t's sequence; ce_k[t] = loss[t] ∧ pos[t] ≥ k;
    rl_k[t] = ce_k[t] ∧ resp[t−k+1]."""
    resp_BT, pos_BT = response_mask_BT.bool(), position_ids_BT
    loss_BT = torch.zeros_like(resp_BT)
    loss_BT[:, :-1] = resp_BT[:, 1:] & (pos_BT[:, 1:] == pos_BT[:, :-1] + 1)
    ce, rl = [], []
    for k in range(1, depth + 1):
        ce_BT = loss_BT & (pos_BT >= k)
        resp_back_BT = torch.zeros_like(resp_BT)  # resp[t−k+1]
        resp_back_BT[:, k - 1:] = resp_BT[:, :resp_BT.shape[1] - k + 1]
        ce.append(ce_BT)
        rl.append(ce_BT & resp_back_BT)
    return loss_BT, torch.stack(ce), torch.stack(rl)
