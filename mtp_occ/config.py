"""The typed configuration tree: one schema, composed by Hydra, converted once.

Flow: CLI overrides -> Hydra composes `conf/config.yaml` against these dataclasses (typos, unknown keys
and wrong types fail at compose time) -> `OmegaConf.to_object` once -> plain dataclasses whose
`__post_init__` validates values and cross-field constraints with messages that name the key and the
fix. Nothing downstream sees an OmegaConf object; `build_*` functions receive flat arguments.

Every field is documented once, here, next to its definition. Choices are Enums or registry names, never
`_target_` strings. Regimes are polymorphic: each regime file registers its own `RegimeConfig`
subclass (see `mtp_occ.regimes`), so `regime=occ` needs no yaml and `regime=nope` lists the valid names.

How to look at a composed config: `python -m mtp_occ.run --cfg job [overrides...]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise `ConfigError` naming `key` unless `cond` holds."""
    if not cond:
        raise ConfigError(f"config key `{key}`: {msg}")


# ----------------------------------------------------------------------------------------------- enums
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
    vllm = "vllm"  # colocated vLLM engine (GPU only)


class DataSource(str, Enum):
    arith = "arith"  # the embedded synthetic verifiable task (no download)
    jsonl = "jsonl"  # local jsonl with `problem` and `answer` fields
    hub = "hub"  # Hugging Face dataset id


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------- groups
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
    cache_dir: str = ""  # "" = $MTP_OCC_CACHE or ~/.cache/mtp_occ

    def __post_init__(self) -> None:
        require(self.steps >= 0, "model.pretrain.steps", f"must be >= 0, got {self.steps}")
        require(self.batch_size >= 1, "model.pretrain.batch_size", "must be >= 1")
        require(self.lr > 0, "model.pretrain.lr", "must be > 0")

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
    """Base of every regime's config; subclasses live in `mtp_occ/regimes/` and register themselves."""

    # True for regimes whose λ is estimated from δ = logp - logp_old (needs several updates per step)
    calibrated: ClassVar[bool] = False

    name: str = MISSING
    lam: float = 0.1  # λ: the MTP term's coefficient (OCC: unused, see lambda_plus)
    grad_path: GradPathConfig = field(default_factory=GradPathConfig)

    def __post_init__(self) -> None:
        require(self.lam >= 0, "regime.lam", f"must be >= 0, got {self.lam}")


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


@dataclass
class AlgoConfig:
    """DAPO/GRPO as in the paper's runs (DESIGN §1.4). One RL step = one rollout batch of
    `prompts_per_step * group_size` samples, trained with `updates_per_step` optimizer updates."""

    prompts_per_step: int = 64
    group_size: int = 8  # samples per prompt (GRPO group)
    updates_per_step: int = 4  # mini-batches per step; OCC needs > 1 (λ == 0 on the first update)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole mini-batch
    level: PolicyLevel = PolicyLevel.token
    clip_low: float = 0.2
    clip_high: float = 0.28  # DAPO clip-higher
    dual_clip: float = 10.0  # cap for negative advantages; 0 disables
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum (Dr. GRPO style)
    norm_std: bool = True  # False = Dr. GRPO (mean-centred only)
    adv_eps: float = 1e-6
    overlong_buffer: int = 0  # DAPO soft overlong penalty buffer in tokens; 0 = off (paper: 4096)
    overlong_factor: float = 1.0
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, refill from new prompts
    dynamic_sampling_max_batches: int = 3  # rollout batches tried per step before training on fewer
    lr: float = 3e-5
    lr_schedule: LrSchedule = LrSchedule.constant
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    max_bad_steps: int = 3  # consecutive steps with every update skipped (non-finite) before the run stops

    def __post_init__(self) -> None:
        require(self.group_size >= 2, "algo.group_size",
                f"must be >= 2 (group-normalised advantages need a group), got {self.group_size}")
        require(self.prompts_per_step >= 1, "algo.prompts_per_step", "must be >= 1")
        require(self.updates_per_step >= 1, "algo.updates_per_step", "must be >= 1")
        require(self.prompts_per_step % self.updates_per_step == 0, "algo.updates_per_step",
                f"must divide algo.prompts_per_step ({self.prompts_per_step}); mini-batches hold whole "
                f"groups, got {self.updates_per_step}")
        require(self.agg in AGGREGATIONS, "algo.agg", f"must be one of {AGGREGATIONS}, got {self.agg!r}")
        require(self.micro_batch_size >= 0, "algo.micro_batch_size", "must be >= 0 (0 = whole mini-batch)")
        require(0 <= self.clip_low < 1, "algo.clip_low", f"must be in [0, 1), got {self.clip_low}")
        require(self.clip_high >= 0, "algo.clip_high", "must be >= 0")
        require(self.dual_clip == 0 or self.dual_clip > 1, "algo.dual_clip", "must be 0 (off) or > 1")
        require(self.lr > 0, "algo.lr", f"must be > 0, got {self.lr}")
        require(len(self.betas) == 2, "algo.betas", "must hold two numbers")
        require(self.overlong_buffer >= 0, "algo.overlong_buffer", "must be >= 0")
        require(self.grad_clip >= 0, "algo.grad_clip", "must be >= 0 (0 disables)")
        require(self.max_bad_steps >= 1, "algo.max_bad_steps",
                f"must be >= 1 (0 would stop every run at step 1), got {self.max_bad_steps}")


@dataclass
class RolloutConfig:
    """How samples are generated. Old log-probs are always recomputed by the trainer."""

    backend: RolloutBackend = RolloutBackend.hf
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 48
    max_prompt_len: int = 64  # longer prompts are left-truncated with a warning count
    batch_size: int = 0  # sequences per `generate` call; 0 = all at once
    # vLLM only
    gpu_memory_utilization: float = 0.5
    speculative_mtp: bool = False  # MTP speculative decoding; the drafter's weights sync every step
    tis_cap: float = 0.0  # truncated importance sampling cap on pi_train/pi_vllm; 0 = off

    def __post_init__(self) -> None:
        require(self.temperature > 0, "rollout.temperature", "must be > 0 for RL sampling")
        require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")


@dataclass
class RewardConfig:
    """Verifiable reward: answer extraction + a grader from `mtp_occ.rewards.GRADERS`."""

    grader: str = "math_verify"  # math_verify | dapo | exact
    extract: str = "boxed"  # boxed (last \\boxed{}) | answer_line (DAPO "Answer: ...")
    timeout_s: float = 2.0  # hard per-item wall-clock limit; a timed-out item scores 0
    workers: int = 0  # grading processes; 0 = number of cores (at most 8)
    compare_with: str = ""  # a second grader: logs reward/disagreement between the two

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "reward.timeout_s", "must be > 0")
        require(self.extract in ("boxed", "answer_line"), "reward.extract",
                f"must be boxed or answer_line, got {self.extract!r}")
        from mtp_occ.rewards import GRADERS  # stdlib-only module: cheap

        require(self.grader in GRADERS, "reward.grader", f"must be one of {sorted(GRADERS)}, got {self.grader!r}")
        require(self.compare_with in ("", *GRADERS), "reward.compare_with",
                f"must be '' (off) or one of {sorted(GRADERS)}, got {self.compare_with!r}")


@dataclass
class DataConfig:
    """Training prompts."""

    source: DataSource = DataSource.arith
    path: str = ""  # source=jsonl: file path (`${oc.env:MTP_OCC_DATA}`-style interpolation is fine)
    hub_id: str = ""  # source=hub
    split: str = "train"
    template: str = "plain"  # prompt template name from mtp_occ.eval.templates
    shuffle: bool = True
    # source=arith: left-to-right chains of `n_terms` numbers in [min_operand, max_operand]
    n_terms: int = 3
    min_operand: int = 10
    max_operand: int = 99
    heldout_size: int = 1000  # held-out problems for evaluation (disjoint from training prompts)
    seed: int = 0  # the task's problems (held-out set, training stream); fixed across RL seeds, so runs of
    # different seeds are evaluated on the same problems and paired tests apply

    def __post_init__(self) -> None:
        if self.source is DataSource.jsonl:
            require(bool(self.path), "data.path", "source=jsonl needs a file path")
        if self.source is DataSource.hub:
            require(bool(self.hub_id), "data.hub_id", "source=hub needs a dataset id")
        require(self.n_terms >= 2, "data.n_terms", "must be >= 2")
        require(0 <= self.min_operand <= self.max_operand, "data.min_operand",
                "must satisfy 0 <= min_operand <= max_operand")
        from mtp_occ.eval.templates import TEMPLATES

        require(self.template in TEMPLATES, "data.template", f"must be one of {sorted(TEMPLATES)}, got {self.template!r}")


@dataclass
class EvalConfig:
    """Evaluation after training (and every `eval_every` steps)."""

    enabled: bool = True
    benchmarks: list[str] = field(default_factory=lambda: ["arith"])  # "arith" = the task's held-out set
    data_dir: str = ""  # local benchmark jsonl dir; "" = $MTP_OCC_DATA/benchmarks or ../shared/data/benchmarks
    hub: bool = False  # load benchmarks from the Hugging Face hub instead
    k: int = 4  # samples per problem: avg@k, pass@k, maj@k
    temperature: float = 1.0  # 0 = greedy (then k must be 1)
    top_p: float = 1.0
    max_new_tokens: int = 48
    template: str = "plain"  # qwen_boxed | mimo | plain
    limit: int | None = None  # first N problems of each benchmark
    grader: str = "math_verify"
    timeout_s: float = 2.0
    n_boot: int = 1000  # bootstrap resamples for the 95% CIs

    def __post_init__(self) -> None:
        require(self.k >= 1, "eval.k", f"must be >= 1, got {self.k}")
        require(self.temperature >= 0, "eval.temperature", "must be >= 0")
        require(self.temperature > 0 or self.k == 1, "eval.k", "greedy decoding (temperature=0) needs k=1")
        require(self.limit is None or self.limit >= 1, "eval.limit", "must be null or >= 1")
        from mtp_occ.eval.benchmarks import BENCHMARK_NAMES
        from mtp_occ.eval.templates import TEMPLATES
        from mtp_occ.rewards import GRADERS

        valid = ("arith", *BENCHMARK_NAMES)
        bad = [b for b in self.benchmarks if b not in valid]
        require(bool(self.benchmarks) and not bad, "eval.benchmarks",
                f"unknown benchmark(s) {bad or '(empty list)'}; valid: {', '.join(valid)}")
        require(self.template in TEMPLATES, "eval.template", f"must be one of {sorted(TEMPLATES)}, got {self.template!r}")
        require(self.grader in GRADERS, "eval.grader", f"must be one of {sorted(GRADERS)}, got {self.grader!r}")


@dataclass
class DeepSpeedConfig:
    """DeepSpeed ZeRO; the DeepSpeed json is derived from this and `algo` (no "auto" values)."""

    enabled: bool = False
    stage: int = 0  # ZeRO stage 0..3
    offload_optimizer: bool = False
    bf16: bool = False

    def __post_init__(self) -> None:
        require(self.stage in (0, 1, 2, 3), "deepspeed.stage", f"must be 0, 1, 2 or 3, got {self.stage}")


@dataclass
class DiagnosticsConfig:
    """Exact decomposition c = <g_RL, g_MTP>, v² = ||g_MTP||² every `every` steps (0 = off)."""

    every: int = 0

    def __post_init__(self) -> None:
        require(self.every >= 0, "diagnostics.every", "must be >= 0")


@dataclass
class WandbConfig:
    """metrics.jsonl in the run dir is always written first and is the source of truth."""

    mode: WandbMode = WandbMode.offline
    project: str = "mtp_occ"
    entity: str | None = None
    group: str | None = None  # default: the sweep's name (the run root's last component)
    tags: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ root
@dataclass
class Config:
    """The root. `name` keys the run dir `<run_root>/<name>/`; by default it is derived from the
    command-line overrides, so a requeued or re-run job finds its own checkpoint."""

    model: ModelConfig = MISSING
    regime: RegimeConfig = MISSING
    coef_schedule: CoefScheduleConfig = MISSING
    algo: AlgoConfig = MISSING
    rollout: RolloutConfig = MISSING
    reward: RewardConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    name: str = "default"
    run_root: str = "runs"
    seed: int = 0
    steps: int = 100  # RL steps (one rollout batch each)
    save_every: int = 25  # checkpoint every N steps (and at the end); 0 = only at the end
    eval_every: int = 0  # evaluate every N steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 2
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda
    dry_run: bool = False  # compose, validate and print the batch arithmetic; build nothing

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(self.save_every >= 0, "save_every", "must be >= 0")
        require(self.eval_every >= 0, "eval_every", "must be >= 0")
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        if self.regime.calibrated and self.algo.updates_per_step == 1:
            import warnings

            warnings.warn(f"regime={self.regime.name} with algo.updates_per_step=1: logp == logp_old at the only update, "
                          "so δ_RL = 0 and λ is identically 0. Use several mini-batch updates per step.",
                          stacklevel=2)
        if self.rollout.speculative_mtp:
            require(self.rollout.backend is RolloutBackend.vllm, "rollout.speculative_mtp",
                    "needs rollout=vllm (the HF backend has no drafter); or set rollout.speculative_mtp=false")
            require(self.model.source is ModelSource.mimo, "rollout.speculative_mtp",
                    f"vLLM's MTP drafter reads MiMo-layout checkpoints, model.source is {self.model.source.value}; "
                    "use model=mimo_7b or set rollout.speculative_mtp=false")
        if self.eval.enabled and "arith" in self.eval.benchmarks:
            require(self.data.source is DataSource.arith, "eval.benchmarks",
                    "'arith' is the embedded task's held-out set; it needs data=arith")

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name


# keys that name a run first, so that a shortened name still shows what a sweep varies
NAME_PRIORITY = ("experiment", "regime", "coef_schedule", "seed", "regime.lam", "regime.lambda_plus", "model")
NAME_EXCLUDE = ("name", "run_root", "hydra/launcher", "wandb.mode", "wandb.group", "threads", "device", "dry_run")
MAX_NAME = 100


def run_name(overrides: list[str]) -> str:
    """A stable, filesystem-safe run name from command-line overrides: bookkeeping keys dropped, the
    keys that usually vary in a sweep first, the rest sorted; names over MAX_NAME characters keep their
    first part and end with a hash of the whole, so two runs never share a dir. "default" if empty."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in NAME_EXCLUDE and not o.startswith("hydra.")]
    key = {k: i for i, k in enumerate(NAME_PRIORITY)}
    kept.sort(key=lambda o: (key.get(o.split("=", 1)[0].lstrip("+~"), len(key)), o))
    name = ",".join(kept).replace("/", "_").replace(" ", "")
    if len(name) > MAX_NAME:
        import hashlib

        name = f"{name[:MAX_NAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name or "default"


def run_name_from_overrides() -> str:
    """The default `name`: `run_name` of this Hydra job's overrides ("default" outside a Hydra job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (compose API)
        overrides = []
    return run_name(overrides)


def register_configs() -> None:
    """Store the schema and every registered regime in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from mtp_occ.regimes import REGIME_CONFIGS

    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name_from_overrides, use_cache=False)
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for name, node in REGIME_CONFIGS.items():
        cs.store(group="regime", name=name, node=node)


def plain_dict(cfg: Any) -> dict:
    """A JSON/YAML-safe nested dict of a converted config (Enums become their values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _reject_unknown_keys(node: Any, path: str = "") -> None:
    """`+group.key=value` adds a key the schema lacks, and `to_object` would keep it silently: refuse it."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    typ = OmegaConf.get_type(node)
    names = [f.name for f in dataclasses.fields(typ)] if dataclasses.is_dataclass(typ) else None
    for key in node.keys():
        full = f"{path}{key}"
        require(names is None or key in names, full,
                f"unknown key; valid keys under `{path.rstrip('.') or '<root>'}`: {', '.join(names or [])}")
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _reject_unknown_keys(child, f"{full}.")


def to_config(dcfg: Any) -> Config:
    """Convert a composed DictConfig once into plain dataclasses (runs every `__post_init__`)."""
    from omegaconf import OmegaConf

    _reject_unknown_keys(dcfg)
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> Config:
    """Compose `conf/config.yaml` with `overrides` outside a Hydra job (tests, resume, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir or CONF_DIR), version_base="1.3"):
        dcfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_config(dcfg)
