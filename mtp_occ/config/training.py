"""How a run trains and is measured: the RL algorithm, rollouts, reward, training data, evaluation,
DeepSpeed, gradient diagnostics and W&B."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtp_occ.config.enums import AGGREGATIONS, LrSchedule, PolicyLevel, RolloutBackend, WandbMode
from mtp_occ.config.errors import require


@dataclass
class AlgoConfig:
    """DAPO/GRPO as in the paper's runs (DESIGN §1.4). One RL step = one rollout batch of
    `prompts_per_step * group_size` samples, trained with `updates_per_step` optimizer updates."""

    prompts_per_step: int = 64
    group_size: int = 8  # samples per prompt (GRPO group)
    updates_per_step: int = 4  # mini-batches per step; OCC needs > 1 (λ == 0 on the first update)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole mini-batch (with a token budget: a row cap)
    # Token budget per forward/backward (verl's dynamic batch size, `ppo_max_token_len_per_gpu`); 0 = off. Rows
    # are sorted by length and filled in order while the micro-batch's size stays within the budget, counted
    # on the tensor the forward sees: rows x trimmed width (padded) or the sum of lengths (`pack_sequences`).
    # Must be >= the longest sequence (rollout.max_prompt_len + rollout.max_new_tokens). Losses keep the
    # mini-batch's normalisers, so the update is the same as without it (to round-off); see `mtp_occ.update`.
    max_tokens_per_micro_batch: int = 0
    # Padding removal (verl's `use_remove_padding`): each micro-batch's real tokens run as one packed row with
    # per-sequence position ids (`mtp_occ.model.packing`); needs model.attn_implementation eager, sdpa or
    # flash_attention_2/3. On CPU (eager/sdpa) HF builds a dense block-diagonal mask, so only flash-attention
    # (GPU) also skips the padded tokens' attention.
    pack_sequences: bool = False
    # MB of float32 logits per head-projection chunk of the log-probs (`mtp_occ.model.logprob`): tokens per
    # chunk = this / (4 x vocab), e.g. 105 at MiMo's 151,680 and the default; 0 = the dense reference path
    # ([B,T,V] logits at every position; for checks only).
    logprob_chunk_mb: float = 64.0
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
        require(self.max_tokens_per_micro_batch >= 0, "algo.max_tokens_per_micro_batch",
                f"must be >= 0 (0 = off), got {self.max_tokens_per_micro_batch}")
        require(self.logprob_chunk_mb >= 0, "algo.logprob_chunk_mb",
                f"must be >= 0 (0 = dense reference), got {self.logprob_chunk_mb}")
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
    gpu_memory_utilization: float = 0.5  # GPU: share of device memory; CPU build: share of RAM (see kv_cache_mib)
    kv_cache_mib: int = 0  # explicit KV cache size; 0 = from gpu_memory_utilization. Set it on the CPU build,
    # where the share is taken of the node's RAM minus this process's RSS (a trainer's memory makes it fail)
    sleep_level: int = 2  # between rollouts: 1 offloads the weights, 2 discards them (the next sync rewrites them)
    speculative_mtp: bool = False  # MTP speculative decoding; the drafter's weights sync every step
    tis_cap: float = 0.0  # truncated importance sampling cap on pi_train/pi_vllm; 0 = off
    # after every weight sync the engine's log-probs on a fixed text are compared with the trainer's; a mean
    # gap above this (nats/token) stops the run. None = by model.dtype (`rollout.vllm.PROBE_LIMITS`: 1e-3 for
    # float32, 0.25 for bfloat16/float16; the README gives the measured levels they sit above)
    max_logprob_mismatch: float | None = None

    def __post_init__(self) -> None:
        require(self.temperature > 0, "rollout.temperature", "must be > 0 for RL sampling")
        require(self.max_logprob_mismatch is None or self.max_logprob_mismatch > 0, "rollout.max_logprob_mismatch",
                f"must be > 0 (or null: by model.dtype), got {self.max_logprob_mismatch}")
        require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        require(self.kv_cache_mib >= 0, "rollout.kv_cache_mib", f"must be >= 0 (0 = off), got {self.kv_cache_mib}")
        require(self.sleep_level in (1, 2), "rollout.sleep_level", f"must be 1 or 2, got {self.sleep_level}")
        require(self.tis_cap >= 0, "rollout.tis_cap", f"must be >= 0 (0 = off), got {self.tis_cap}")
        # vLLM's processed log-probs are renormalised over the kept tokens, the trainer's are not: the IS
        # weights would be the kept probability mass, not a sampler/trainer correction
        require(self.tis_cap == 0 or (self.top_p == 1 and self.top_k == 0), "rollout.tis_cap",
                f"needs untruncated sampling (top_p=1, top_k=0; got {self.top_p}, {self.top_k}): set "
                "rollout.tis_cap=0 or drop the truncation")
        require(self.tis_cap == 0 or not self.speculative_mtp, "rollout.tis_cap",
                "needs the engine's log-probs, which speculative decoding does not provide: set rollout.tis_cap=0 "
                "or rollout.speculative_mtp=false")


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

    # a registered task (`mtp_occ.tasks`: "arith", the embedded task, needs no download), "jsonl" (a local
    # file with `problem` and `answer` fields) or "hub" (a Hugging Face dataset id)
    source: str = "arith"
    path: str = ""  # source=jsonl: file path (`${data_file:train/x.jsonl}` resolves under the data root)
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
        from mtp_occ.tasks import FILE_SOURCES, TASKS

        valid = (*TASKS, *FILE_SOURCES)
        require(self.source in valid, "data.source", f"must be one of {', '.join(valid)}, got {self.source!r}")
        if self.source == "jsonl":
            require(bool(self.path), "data.path", "source=jsonl needs a file path")
        if self.source == "hub":
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
    benchmarks: list[str] = field(default_factory=lambda: ["arith"])  # a task's name = its held-out set
    data_dir: str = ""  # local benchmark jsonl dir; "" = the shipped copies (or $MTP_OCC_DATA/benchmarks)
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
    # also score the MTP head on the evaluation samples: `eval/mtp_accept`, depth 1's argmax = the sampled token on
    # response tokens (a CPU proxy of speculative acceptance; one no-grad forward over the samples)
    mtp_accept: bool = True

    def __post_init__(self) -> None:
        require(self.k >= 1, "eval.k", f"must be >= 1, got {self.k}")
        require(self.temperature >= 0, "eval.temperature", "must be >= 0")
        require(self.temperature > 0 or self.k == 1, "eval.k", "greedy decoding (temperature=0) needs k=1")
        require(self.limit is None or self.limit >= 1, "eval.limit", "must be null or >= 1")
        from mtp_occ.eval.benchmarks import BENCHMARK_NAMES
        from mtp_occ.eval.templates import TEMPLATES
        from mtp_occ.rewards import GRADERS
        from mtp_occ.tasks import TASKS

        valid = (*TASKS, *BENCHMARK_NAMES)
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
