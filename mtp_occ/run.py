"""`python -m mtp_occ.run [overrides]`: compose the config, train, evaluate, print a summary.

    python -m mtp_occ.run                                   # the embedded CPU default (regime=occ)
    python -m mtp_occ.run -m regime=detach,ce,policy,occ    # the four regimes, one shared base model
    python -m mtp_occ.run experiment=paper_mimo7b_dapo --cfg job   # show a composed config
    python -m mtp_occ.run dry_run=true ...                  # validate + batch arithmetic, build nothing

Re-running the same command resumes from the run dir's last checkpoint (the run name derives from the
overrides). Config errors are reported as one line naming the key, before any model is built.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mtp_occ.config import Config, ConfigError, register_configs, to_config

log = logging.getLogger("mtp_occ")
register_configs()
os.environ.setdefault("WANDB_SILENT", "true")  # our own summary names the run dir and the wandb files


def describe(cfg: Config) -> str:
    """The batch arithmetic a user checks before spending GPU hours."""
    a = cfg.algo
    rollouts = a.prompts_per_step * a.group_size
    per_update = rollouts // a.updates_per_step
    micro = a.micro_batch_size or per_update
    lines = [
        f"run dir            {cfg.run_dir}",
        f"model              {cfg.model.name} ({cfg.model.source.value}: {cfg.model.name_or_path or 'built in code'}), "
        f"MTP depth {cfg.model.mtp_depth}, {cfg.model.concat_order.value}",
        f"regime             {cfg.regime.name} (grad path {cfg.regime.grad_path}), schedule {cfg.coef_schedule.name.value}",
        f"rollouts / step    {a.prompts_per_step} prompts x {a.group_size} = {rollouts} sequences, "
        f"max {cfg.rollout.max_prompt_len}+{cfg.rollout.max_new_tokens} tokens",
        f"updates / step     {a.updates_per_step} of {per_update} sequences "
        f"({per_update // a.group_size} prompts), micro-batch {micro} -> {max(1, per_update // micro)} accumulation steps",
        f"total              {cfg.steps} steps, {cfg.steps * rollouts} rollouts, {cfg.steps * a.updates_per_step} updates",
        f"deepspeed          {'ZeRO-' + str(cfg.deepspeed.stage) if cfg.deepspeed.enabled else 'off'}",
        f"eval               {', '.join(cfg.eval.benchmarks)} avg@{cfg.eval.k} (T={cfg.eval.temperature})",
    ]
    return "\n".join(lines)


def _fmt_eval(summary: dict | None) -> str:
    if not summary:
        return "n/a"
    return ", ".join(f"{n} {100 * b['avg']:.1f} [{100 * b['avg_ci'][0]:.1f}, {100 * b['avg_ci'][1]:.1f}]"
                     for n, b in summary["benchmarks"].items())


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> float | None:
    try:
        cfg = to_config(dcfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(describe(cfg))
    if cfg.dry_run:
        return None
    from mtp_occ.train import train

    out = train(cfg, list(HydraConfig.get().overrides.task))
    k = cfg.eval.k
    print(f"\n== {cfg.name} finished in {out['seconds'] / 60:.1f} min ==")
    print(f"base  avg@{k}: {_fmt_eval(out['base_eval'])}")
    print(f"final avg@{k}: {_fmt_eval(out['final_eval'])}")
    print(f"run dir: {out['run_dir']}")
    final = out["final_eval"]
    return final["average"]["avg"] if final else None


if __name__ == "__main__":
    main()
