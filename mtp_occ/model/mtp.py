"""Sequential MTP layers (DeepSeek-V3 / MiMo style) on top of any HF causal LM, with configurable
gradient paths and log-probs aligned for RL.

Depth k = 1..K shares the embedding E and the output head H with the main model:
    h^0_t  = last hidden state of the backbone (after its final norm; MiMo: before it)    [B,T,D]
    z^k_t  = P_k · concat(norm_h(h^{k-1}_t), norm_e(E(x_{t+k})))   (order: `concat_order`; MiMo: E(·) = 0
             where position t is 0, as vLLM's drafters compute it)
    h^k    = final_norm_k(Block_k(z^k))         (one causal decoder block of the backbone's own class)
    logits^k_t = H(h^k_t)                       predicts x_{t+k+1}

Alignment (the part frameworks get wrong, DESIGN §1.1). Everything returned is *prediction-aligned* like
the main head: index t scores the token x_{t+1}.
- `logprob_BT[t]      = log π(x_{t+1} | x_{≤t})`
- `mtp_logprob_KBT[k-1, t] = log p_k(x_{t+1} | h^{k-1}_{t-k}, E(x_{t-k+1..t}))`: depth k's raw prediction
  at position t−k, rolled right by k, so every depth scores the same token as the main head.
- masks, from the *input-aligned* `response_mask_BT` (1 on generated tokens):
  `loss_mask_BT[t] = response[t+1]`; `mtp_ce_mask_KBT[k-1,t] = response[t+1] ∧ real(t−k)` (labels rolled
  left by k+1 from the input-aligned mask: the first response token is supervised, from prompt inputs);
  `mtp_rl_mask_KBT[k-1,t] = response[t+1] ∧ response[t−k+1]` (the MTP inputs lie inside the response: the
  first k response positions have no MTP prediction from inside the response and are masked explicitly).
Packed input (`position_ids_BT` given: several sequences in one row, positions restarting at 0, see
`mtp_occ.model.packing`): the masks come from the positions, so no label, MTP input or aligned log-prob is
ever taken across a sequence boundary; wrapped positions are masked either way.

The head is projected only where a mask selects a log-prob, in chunks (`mtp_occ.model.logprob`): no
[B,T,V] logits exist unless `logprob_chunk_mb=0` asks for the dense reference.

Gradient paths (`GradPathConfig`): `embedding` detaches E's weight where the MTP layers read it,
`backbone` detaches h^0, `lm_head` detaches H's weight for the MTP logits. The MTP layers always train.
The embedding table still receives MTP gradient *through the backbone* when `backbone=true`: one forward
pass cannot split the backbone's input gradient by source, and the paper's code detaches inputs the same
way. Models with tied embeddings share one tensor between `embedding` and `lm_head`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtp_occ.config import ConcatOrder, GradPathConfig
from mtp_occ.model.logprob import head_logprob_BT
from mtp_occ.model.packing import packed_aligned_masks

ALL_PATHS = GradPathConfig(embedding=True, backbone=True, lm_head=True)


def shift_left_BT(x_BT: torch.Tensor, n: int, fill: int | float | bool = 0) -> torch.Tensor:
    """out[:, t] = x[:, t+n]; the last n columns are `fill` (never wrapped)."""
    out = torch.full_like(x_BT, fill)
    if n < x_BT.shape[1]:
        out[:, : x_BT.shape[1] - n] = x_BT[:, n:]
    return out


def shift_right_BT(x_BT: torch.Tensor, n: int, fill: int | float | bool = 0) -> torch.Tensor:
    """out[:, t] = x[:, t−n]; the first n columns are `fill`."""
    out = torch.full_like(x_BT, fill)
    if n < x_BT.shape[1]:
        out[:, n:] = x_BT[:, : x_BT.shape[1] - n]
    return out


def aligned_masks(attention_mask_BT: torch.Tensor, response_mask_BT: torch.Tensor, depth: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_mask_BT, mtp_ce_mask_KBT, mtp_rl_mask_KBT) as bool, see the module docstring."""
    resp_BT = response_mask_BT.bool() & attention_mask_BT.bool()
    real_BT = attention_mask_BT.bool()
    loss_BT = shift_left_BT(resp_BT, 1, False)
    ce, rl = [], []
    for k in range(1, depth + 1):
        ce.append(loss_BT & shift_right_BT(real_BT, k, False))
        rl.append(loss_BT & shift_right_BT(resp_BT, k - 1, False) & shift_right_BT(real_BT, k, False))
    return loss_BT, torch.stack(ce), torch.stack(rl)


class MTPOutput(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 attaches its pre-backward hook (which gathers the model's
    external parameters, the head weight among them, for the chunked log-prob backward) only to tensors
    it finds in tuples, lists and dicts."""

    logprob_BT: torch.Tensor
    mtp_logprob_KBT: torch.Tensor
    loss_mask_BT: torch.Tensor
    mtp_ce_mask_KBT: torch.Tensor
    mtp_rl_mask_KBT: torch.Tensor
    mtp_ce_K: torch.Tensor  # masked token CE per depth (mean over this batch's valid tokens)
    mtp_hit_KBT: torch.Tensor | None = None  # depth k's argmax is the target (on its CE mask): draft acceptance
    # the MTP layers' log-probs with every shared input detached (`head_ce`; None when not asked for)
    mtp_head_logprob_KBT: torch.Tensor | None = None


class MTPLayer(nn.Module):
    """One MTP depth. Submodule names follow MiMo's checkpoint layout (`block.` holds the decoder
    layer's `input_layernorm, self_attn, post_attention_layernorm, mlp`)."""

    def __init__(self, hf_config, block: nn.Module, norm_cls: type[nn.Module], concat_order: ConcatOrder):
        super().__init__()
        d, eps = hf_config.hidden_size, getattr(hf_config, "rms_norm_eps", 1e-6)
        self.concat_order = concat_order
        self.token_layernorm = norm_cls(d, eps=eps)
        self.hidden_layernorm = norm_cls(d, eps=eps)
        self.input_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.final_layernorm = norm_cls(d, eps=eps)

    def forward(self, h_prev_BTD, e_BTD, attn_mask, position_ids_BT, position_embeddings):
        h_BTD, e_BTD = self.hidden_layernorm(h_prev_BTD), self.token_layernorm(e_BTD)
        parts = [h_BTD, e_BTD] if self.concat_order is ConcatOrder.hidden_first else [e_BTD, h_BTD]
        z_BTD = self.input_proj(torch.cat(parts, dim=-1))
        z_BTD = self.block(z_BTD, attention_mask=attn_mask, position_ids=position_ids_BT,
                           position_embeddings=position_embeddings)
        if isinstance(z_BTD, tuple):  # older decoder layers return (hidden, ...)
            z_BTD = z_BTD[0]
        return self.final_layernorm(z_BTD)


class MTPModel(nn.Module):
    """An HF causal LM (`self.lm`, used as is for generation) plus `self.mtp`, K `MTPLayer`s."""

    def __init__(self, lm: nn.Module, mtp: nn.ModuleList, concat_order: ConcatOrder):
        super().__init__()
        self.lm, self.mtp, self.concat_order = lm, mtp, concat_order
        # MiMo: the MTP layers read the backbone's last state *before* its final norm, as vLLM's MiMo drafter
        # does (set by `load_pretrained` for source=mimo); DeepSeek-V3-style fresh layers read it after
        self.prenorm_hidden = False
        # MiMo: the token embedding the MTP layers read is zero at position 0, as vLLM's MTP drafters (mimo_mtp,
        # deepseek_mtp, ...) set it; that position's MTP state is in every later position's attention context,
        # so without it the drafter's proposals differ from the trained head's (measured: tests/test_vllm_drafter.py)
        self.zero_first_embedding = False

    @property
    def depth(self) -> int:
        return len(self.mtp)

    def shared_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The shared parameter groups the MTP loss may reach, keyed like `GradPathConfig`
        (with tied embeddings `embedding` and `lm_head` hold the same tensor)."""
        emb = self.lm.get_input_embeddings().weight
        backbone = [p for p in self.lm.model.parameters() if p is not emb]
        return {"embedding": [emb], "backbone": backbone,
                "lm_head": list(self.lm.get_output_embeddings().parameters())}

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                response_mask_BT: torch.Tensor, grad_path: GradPathConfig = ALL_PATHS,
                temperature: float = 1.0, with_mtp: bool = True, logprob_chunk_mb: float = 64.0,
                position_ids_BT: torch.Tensor | None = None, head_ce: bool = False) -> MTPOutput:
        """`logprob_chunk_mb`: MB of float32 logits per head chunk (0 = dense reference); `position_ids_BT`:
        packed rows (then `attention_mask_BT` is ignored: HF builds the block-diagonal mask, or flash-attention
        its varlen boundaries, from the positions). `head_ce`: also `mtp_head_logprob_KBT`, the MTP layers
        run on detached inputs (h⁰, E's weight, H's weight), so a loss on them trains the MTP layers only; a
        second pass through the MTP layers unless `grad_path` already detaches everything."""
        from transformers.masking_utils import create_causal_mask

        packed = position_ids_BT is not None
        pos_BT = position_ids_BT if packed else (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)
        hf_mask_BT = None if packed else attention_mask_BT
        backbone = self.lm.model
        embeds_BTD = backbone.embed_tokens(input_ids_BT)
        # use_cache=False: a training forward needs no KV cache (it would hold every layer's K, V, and its
        # presence turns off HF's packed-sequence masks)
        pre_norm = []  # the final norm's input, captured only when the MTP layers read it
        hook = backbone.norm.register_forward_pre_hook(lambda _m, a: pre_norm.append(a[0])) \
            if self.prenorm_hidden and with_mtp else None
        try:
            h_BTD = backbone(inputs_embeds=embeds_BTD, attention_mask=hf_mask_BT, position_ids=pos_BT,
                             use_cache=False).last_hidden_state
        finally:
            if hook is not None:
                hook.remove()
        head = self.lm.get_output_embeddings()
        loss_BT, ce_mask_KBT, rl_mask_KBT = (packed_aligned_masks(pos_BT, response_mask_BT, self.depth) if packed
                                             else aligned_masks(attention_mask_BT, response_mask_BT, self.depth))
        targets_BT = shift_left_BT(input_ids_BT, 1)  # every depth's aligned index t scores x_{t+1}
        logprob_BT = head_logprob_BT(h_BTD, head.weight, head.bias, targets_BT, loss_BT, temperature,
                                     logprob_chunk_mb)
        if not with_mtp:
            empty = logprob_BT.new_zeros((0,) + tuple(logprob_BT.shape))
            return MTPOutput(logprob_BT, empty, loss_BT, ce_mask_KBT[:0], rl_mask_KBT[:0], logprob_BT.new_zeros(0))
        mask4d = create_causal_mask(config=backbone.config, inputs_embeds=embeds_BTD, attention_mask=hf_mask_BT,
                                    past_key_values=None, position_ids=pos_BT)
        rope = backbone.rotary_emb(h_BTD, position_ids=pos_BT)
        emb_w = backbone.embed_tokens.weight if grad_path.embedding else backbone.embed_tokens.weight.detach()
        h0_BTD = pre_norm[-1] if pre_norm else h_BTD
        run = dict(input_ids_BT=input_ids_BT, ce_mask_KBT=ce_mask_KBT, targets_BT=targets_BT, mask4d=mask4d,
                   pos_BT=pos_BT, rope=rope, temperature=temperature, chunk_mb=logprob_chunk_mb)
        mtp_KBT, hit_KBT = self._mtp_pass(h0_BTD if grad_path.backbone else h0_BTD.detach(), emb_w,
                                          grad_path.lm_head, **run)
        head_KBT = None
        if head_ce:
            detached = not (grad_path.embedding or grad_path.backbone or grad_path.lm_head)
            head_KBT = mtp_KBT if detached else self._mtp_pass(h0_BTD.detach(), emb_w.detach(), False, **run)[0]
        ces = []
        for k in range(self.depth):  # one depth at a time (the float sums the pre-training loss was pinned with)
            m_BT = ce_mask_KBT[k].to(mtp_KBT.dtype)
            ces.append(-(mtp_KBT[k] * m_BT).sum() / m_BT.sum().clamp(min=1.0))
        ce_K = torch.stack(ces)
        return MTPOutput(logprob_BT, mtp_KBT, loss_BT, ce_mask_KBT, rl_mask_KBT, ce_K, hit_KBT, head_KBT)

    def _mtp_pass(self, h_prev, emb_w, head_grad: bool, *, input_ids_BT, ce_mask_KBT, targets_BT, mask4d, pos_BT,
                  rope, temperature: float, chunk_mb: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, argmax hits) of every depth, aligned: depth k's raw prediction at t−k scores x_{t+1},
        read there only where its CE mask selects it."""
        head = self.lm.get_output_embeddings()
        lps, hits = [], []
        for k, layer in enumerate(self.mtp, start=1):
            e_BTD = F.embedding(shift_left_BT(input_ids_BT, k), emb_w)
            if self.zero_first_embedding:
                e_BTD = e_BTD.masked_fill((pos_BT == 0)[..., None], 0.0)
            h_prev = layer(h_prev, e_BTD, mask4d, pos_BT, rope)
            lp_BT, hit_BT = head_logprob_BT(h_prev, head.weight, head.bias, targets_BT, ce_mask_KBT[k - 1],
                                            temperature, chunk_mb, shift=k, weight_grad=head_grad, return_hit=True)
            lps.append(lp_BT)
            hits.append(hit_BT)
        return torch.stack(lps), torch.stack(hits)
