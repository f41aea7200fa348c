"""The root `Config`: every group, the run's own keys (name, steps, checkpoints, device) and the checks
that span groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from mtp_occ.config.enums import ConcatOrder, ModelSource, RolloutBackend
from mtp_occ.config.errors import require
from mtp_occ.config.model import CoefScheduleConfig, ModelConfig, RegimeConfig
from mtp_occ.config.training import (
    AlgoConfig,
    DataConfig,
    DeepSpeedConfig,
    DiagnosticsConfig,
    EvalConfig,
    RewardConfig,
    RolloutConfig,
    WandbConfig,
)


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
        self._check_across_groups()

    def _check_across_groups(self) -> None:
        """Every check that spans config groups, at compose time: `dry_run=true` and the SLURM pre-submit
        check (`mtp_occ.run`) catch them before a job waits in the queue. Checks that depend on the
        machine (CUDA, vLLM's build) run in `mtp_occ.train.check_environment`."""
        from mtp_occ.model.packing import PACKING_ATTENTION
        from mtp_occ.tasks import TASKS

        if self.regime.calibrated and not self.regime.exact_gradients and self.algo.updates_per_step == 1:
            import warnings

            warnings.warn(f"regime={self.regime.name} with algo.updates_per_step=1: logp == logp_old at the only update, "
                          "so δ_RL = 0 and λ is identically 0. Use several mini-batch updates per step.",
                          stacklevel=3)
        if self.rollout.speculative_mtp:
            require(self.rollout.backend is RolloutBackend.vllm, "rollout.speculative_mtp",
                    "needs rollout=vllm (the HF backend has no drafter); or set rollout.speculative_mtp=false")
            require(self.model.source is ModelSource.mimo, "rollout.speculative_mtp",
                    f"vLLM's MTP drafter reads MiMo-layout checkpoints, model.source is {self.model.source.value}; "
                    "use model=mimo_7b or set rollout.speculative_mtp=false")
            # vLLM's MiMo drafter computes input_proj(cat[hidden, embedding]): trained in another order, the
            # synced weights would draft from a permuted input
            require(self.model.concat_order is ConcatOrder.hidden_first, "model.concat_order",
                    f"{self.model.concat_order.value}, but vLLM's MiMo drafter concatenates (hidden, embedding): "
                    "set model.concat_order=hidden_first or rollout.speculative_mtp=false")
        for name in self.eval.benchmarks if self.eval.enabled else ():
            require(name not in TASKS or self.data.source == name, "eval.benchmarks",
                    f"{name!r} is a task's held-out set; it needs data={name} (data.source is {self.data.source!r})")
        require(self.model.source is not ModelSource.tiny or self.data.source in TASKS, "data.source",
                f"model.source=tiny has no tokenizer of its own; it takes a task's ({', '.join(TASKS)}), and "
                f"data.source is {self.data.source!r}: use data=arith, or pick a hub model (e.g. model=smollm2_135m)")
        require(not (self.deepspeed.enabled and self.diagnostics.every), "diagnostics.every",
                "needs deepspeed=none (ZeRO partitions the gradients it measures); set diagnostics.every=0")
        if self.regime.exact_gradients:
            require(not self.deepspeed.enabled, "regime", f"regime={self.regime.name} needs the whole gradients at "
                    "every update, which ZeRO partitions; use deepspeed=none, or regime=occ")
            require(not self.diagnostics.every, "diagnostics.every", f"regime={self.regime.name} logs the exact c, "
                    "v² and cos itself (occ/c, occ/v2, occ/cos); set diagnostics.every=0")
        require(not self.algo.pack_sequences or self.model.attn_implementation in PACKING_ATTENTION,
                "algo.pack_sequences", f"needs model.attn_implementation in {PACKING_ATTENTION} (they separate packed "
                f"sequences by position ids), got {self.model.attn_implementation!r}; set algo.pack_sequences=false "
                "or change model.attn_implementation")
        longest = self.rollout.max_prompt_len + self.rollout.max_new_tokens
        budget = self.algo.max_tokens_per_micro_batch
        require(not budget or budget >= longest, "algo.max_tokens_per_micro_batch",
                f"{budget} is below the longest possible sequence, rollout.max_prompt_len + rollout.max_new_tokens = "
                f"{longest}; raise it to at least {longest} or shorten the rollouts")

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.name
