"""The root `Config`: every group, the run's own keys (name, steps, checkpoints, device) and the checks
that span groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from mtp_occ.config.enums import DataSource, ModelSource, RolloutBackend
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
