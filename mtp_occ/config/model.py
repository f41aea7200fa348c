"""What is trained: the policy (`ModelConfig`, with its MTP pre-training stage), the MTP gradient path,
the base of every regime's config, and the coefficient schedule."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

from omegaconf import MISSING

from mtp_occ.config.enums import DTYPES, ConcatOrder, ModelSource, MtpInit
from mtp_occ.config.errors import require


@dataclass
class PretrainConfig:
    """MTP pre-training of the embedded task's base model (next-token + MTP CE on worked solutions).

    The result is cached under a key derived from the model, task and this config, so every regime of a
    sweep starts from the same weights and only the first job pays for it."""

    steps: int = 0  # 0 = no pre-training stage (hub models); the tiny preset sets 1300
    batch_size: int = 64
    lr: float = 3e-3  # peak; cosine decay to 10% after `warmup_steps`
    warmup_steps: int = 50
    mtp_weight: float = 0.3  # total loss = CE_main + mtp_weight * mean_k CE_mtp_k
    seed: int = 0  # the base's init and data order; fixed across RL seeds so every run starts from one base
    # torch intra-op threads while pre-training, whatever the run's `threads`: the thread count changes the
    # base's bits (it splits BLAS reductions differently), so it is fixed to make one base on every machine
    threads: int = 2
    cache_dir: str = ""  # "" = $MTP_OCC_CACHE or ~/.cache/mtp_occ

    def __post_init__(self) -> None:
        require(self.steps >= 0, "model.pretrain.steps", f"must be >= 0, got {self.steps}")
        require(self.batch_size >= 1, "model.pretrain.batch_size", "must be >= 1")
        require(self.lr > 0, "model.pretrain.lr", "must be > 0")
        require(self.threads >= 1, "model.pretrain.threads", f"must be >= 1, got {self.threads}")

    def resolved_cache_dir(self) -> Path:
        raw = self.cache_dir or os.environ.get("MTP_OCC_CACHE") or "~/.cache/mtp_occ"
        return Path(raw).expanduser()


@dataclass
class ModelConfig:
    """The policy: an HF causal LM plus K sequential MTP layers (DeepSeek-V3 / MiMo style)."""

    name: str = MISSING  # preset name, recorded for analysis (e.g. tiny, smollm2_135m, mimo_7b)
    source: ModelSource = ModelSource.tiny
    name_or_path: str = ""  # hub id or local dir for source=hf|mimo
    gguf_file: str = ""  # load a GGUF file inside `name_or_path` (dequantised by transformers)
    trust_remote_code: bool = False
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    gradient_checkpointing: bool = False
    mtp_depth: int = 1  # K; RL regimes use every depth, each scoring the same target token
    concat_order: ConcatOrder = ConcatOrder.hidden_first
    mtp_init: MtpInit = MtpInit.copy_last
    # source=tiny only: a random-init Llama of this shape (vocab comes from the tokenizer)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position: int = 256
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        require(self.mtp_depth >= 1, "model.mtp_depth", f"must be >= 1, got {self.mtp_depth}")
        require(self.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.source is not ModelSource.tiny:
            require(bool(self.name_or_path), "model.name_or_path",
                    f"source={self.source.value} needs a hub id or a local path")
        require(self.hidden_size % self.num_heads == 0, "model.hidden_size",
                f"must be divisible by model.num_heads ({self.num_heads})")


@dataclass
class GradPathConfig:
    """Which shared parameters the MTP loss may reach (the MTP layers themselves always train).

    embedding: the MTP layers' token-embedding input E(x_{t+k}).
    backbone:  the hidden-state input h^0 (and so every backbone parameter behind it, including the
               embedding table as the backbone's input: that path is the backbone's, not `embedding`'s).
    lm_head:   the shared output head H applied to the MTP hidden state."""

    embedding: bool = True
    backbone: bool = True
    lm_head: bool = True


@dataclass
class RegimeConfig:
    """Base of every regime's config; subclasses live in `mtp_occ/regimes/` and register themselves.

    A subclass declares its own coefficient keys (`lam` for a fixed λ, `lambda_plus` for OCC's λ₊) as
    fields and names them in `coef_keys`, which run names, analysis tables and reports read instead of
    hard-coding them; a key a regime does not declare is an unknown key (`regime=occ regime.lam=5` fails
    at compose time). `build()` returns the regime object; `mtp_occ.regimes.register` refuses a config
    class that does not define it."""

    # True for regimes that calibrate λ at each update (OCC's family); unless `exact_gradients`, from
    # δ = logp - logp_old, which needs several updates per step
    calibrated: ClassVar[bool] = False
    # the fields that set this regime's coefficient, in display order
    coef_keys: ClassVar[tuple[str, ...]] = ()
    # True for regimes that need the whole, unpartitioned gradients at each update (`occ_exact`)
    exact_gradients: ClassVar[bool] = False

    name: str = MISSING
    grad_path: GradPathConfig = field(default_factory=GradPathConfig)
    # weight of a token CE on the MTP layers run with every shared input detached (h⁰, E's and H's weights):
    # it trains only the MTP layers, so the drafter stays useful for speculative decoding whatever λ and the
    # regime do to it (under `occ` it otherwise gets no CE at all). 0 = off; the paper has no such term and
    # the paper presets keep it off. Costs one more pass through the MTP layers unless grad_path is all false.
    head_ce: float = 0.0

    def __post_init__(self) -> None:
        require(self.head_ce >= 0, "regime.head_ce", f"must be >= 0 (0 = off), got {self.head_ce}")
        for key in self.coef_keys:
            value = getattr(self, key)
            require(value >= 0, f"regime.{key}", f"must be >= 0, got {value}")

    def build(self):
        """The regime object (`mtp_occ.regimes.Regime`) for this converted config."""
        raise NotImplementedError(f"{type(self).__name__} must define build()")


class ScheduleName(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"
    warmup_then_constant = "warmup_then_constant"
    step = "step"


@dataclass
class CoefScheduleConfig:
    """A multiplier on λ (or on λ₊ for OCC) as a pure function of training progress in [0, 1]."""

    name: ScheduleName = ScheduleName.constant
    start: float = 1.0  # multiplier at progress 0 (linear, cosine)
    end: float = 0.0  # multiplier at progress 1 (linear, cosine)
    warmup_frac: float = 0.1  # warmup_then_constant: ramp 0 -> 1 over this fraction of training
    milestones: list[float] = field(default_factory=lambda: [0.5])  # step: progress points
    gamma: float = 0.1  # step: multiply by gamma at each milestone

    def __post_init__(self) -> None:
        require(0.0 <= self.warmup_frac <= 1.0, "coef_schedule.warmup_frac", "must be in [0, 1]")
        require(all(0.0 <= m <= 1.0 for m in self.milestones), "coef_schedule.milestones",
                f"progress points must be in [0, 1], got {self.milestones}")
        require(self.start >= 0 and self.end >= 0, "coef_schedule.start/end", "must be >= 0")
        require(self.gamma >= 0, "coef_schedule.gamma", "must be >= 0")
