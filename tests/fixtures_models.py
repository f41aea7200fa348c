"""Tiny checkpoints in the layouts real ones have, built in code for the real-engine tests: Llama and Qwen2
(q/k/v biases), tied or untied, saved by `save_model`; MiMo's layout (Qwen2 backbone + `model.mtp_layers.*`
in the model shard), tied or untied. d=64 with 2 heads of 32: vLLM's CPU attention needs head size >= 32."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mtp_occ.config import ConcatOrder, MtpInit
from mtp_occ.model.load import attach_mtp, ours_to_mimo_key, save_model

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
LAYOUTS = ["llama-tied", "llama-untied", "qwen2-tied", "qwen2-untied"]


def tiny_config(arch: str, tok, tied: bool):
    return ARCHS[arch][0](vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
                          max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)


def build_layout(layout: str, tok, out_dir):
    """A tiny random-init model of `layout` ("llama-tied", ...), saved with `save_model` (HF files +
    mtp.safetensors), as a fresh-MTP checkpoint would be."""
    arch, tying = layout.split("-")
    torch.manual_seed(0)
    lm = ARCHS[arch][1](tiny_config(arch, tok, tying == "tied"))
    save_model(attach_mtp(lm, 1, ConcatOrder.hidden_first, MtpInit.copy_last), out_dir, tok)
    return out_dir


def write_mimo(d, tok, tied: bool = False):
    """A tiny MiMo-layout checkpoint (Qwen2 backbone keys + model.mtp_layers.0.* in one shard), with a final
    norm far from all-ones so that pre-norm and post-norm hidden states differ."""
    from safetensors.torch import save_file

    cfg = tiny_config("qwen2", tok, tied)
    torch.manual_seed(3)
    src = attach_mtp(Qwen2ForCausalLM(cfg), 1, ConcatOrder.hidden_first, MtpInit.copy_last)
    with torch.no_grad():
        src.lm.model.norm.weight.uniform_(0.2, 3.0)
    state = dict(src.lm.state_dict()) | {ours_to_mimo_key(k): v for k, v in src.mtp.state_dict().items()}
    if tied:
        del state["lm_head.weight"]  # as tied checkpoints are saved
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    raw = cfg.to_dict() | {"architectures": ["MiMoForCausalLM"], "num_nextn_predict_layers": 1}
    (d / "config.json").write_text(json.dumps(raw))
    tok.save_pretrained(str(d))
    return d


def perturb_(model, seed: int, scale: float = 0.05) -> None:
    """Move every parameter by seeded noise (a tied head is one parameter: it moves once, with the embedding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
