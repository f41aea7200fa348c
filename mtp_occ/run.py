"""`python -m mtp_occ.run [overrides]`: compose the config, train, evaluate, print a summary.

    python -m mtp_occ.run                                   # the embedded CPU default (regime=occ)
    python -m mtp_occ.run -m regime=detach,ce,policy,occ    # the four regimes, one shared base model
    python -m mtp_occ.run experiment=paper_mimo7b_dapo --cfg job   # show a composed config
    python -m mtp_occ.run dry_run=true ...                  # validate + batch arithmetic + memory plan, build nothing
    WORLD_SIZE=128 python -m mtp_occ.run experiment=paper_mimo7b_dapo dry_run=true   # the paper's 128 ranks

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
from mtp_occ.eval.benchmarks import BenchmarkDataError

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
        f"({per_update // a.group_size} prompts), " + (
            f"micro-batches of <= {a.max_tokens_per_micro_batch:,} tokens" + (" (packed)" if a.pack_sequences else "")
            + (f", <= {a.micro_batch_size} rows" if a.micro_batch_size else "") if a.max_tokens_per_micro_batch
            else f"micro-batch {micro} -> {max(1, per_update // micro)} accumulation steps"),
        f"total              {cfg.steps} steps, {cfg.steps * rollouts} rollouts, {cfg.steps * a.updates_per_step} updates",
        f"deepspeed          {_describe_ds(cfg)}",
        f"eval               {', '.join(cfg.eval.benchmarks)} avg@{cfg.eval.k} (T={cfg.eval.temperature})",
    ]
    return "\n".join(lines)


def describe_memory(cfg: Config) -> str:
    """The per-rank memory plan (`mtp_occ.memory`) for $WORLD_SIZE ranks, on 80 GB and 141 GB devices and
    the local GPU when there is one."""
    import torch

    from mtp_occ.memory import DEVICES_GB, memory_plan

    plan = memory_plan(cfg)
    if plan is None:
        return f"memory plan         skipped: no local config.json for {cfg.model.name_or_path!r} (and not a known model)"
    local = [torch.cuda.get_device_properties(0).total_memory / 1e9] if torch.cuda.is_available() else []
    return plan.render([*local, *DEVICES_GB])


def _one_line(e: BaseException) -> str:
    """A Hydra / OmegaConf composition error as one line naming the group or key (and the valid choices)."""
    import dataclasses

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"config group `{group}`: unknown option {option!r}; valid: {', '.join(e.options)}"
    if isinstance(e, OverrideParseException):
        return f"override {e.override!r}: {str(e).splitlines()[0]}"
    cause = e if isinstance(e, OmegaConfBaseException) else e.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        line = f"config key `{cause.full_key}`: {str(cause.msg).splitlines()[0]}"
        typ = getattr(cause, "object_type", None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and dataclasses.is_dataclass(typ):
            line += f"; valid keys: {', '.join(f.name for f in dataclasses.fields(typ))}"
        return line
    return " ".join(str(e).split())


def preflight(argv: list[str]) -> None:
    """Compose the command line once before Hydra does, so that an unknown group option, unknown key or wrong
    type is one line naming it, exit code 2 (Hydra itself prints a multi-line report and exits 1). Multirun,
    --cfg and the other Hydra flags are left to Hydra."""
    import warnings

    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mtp_occ.config import compose

    args, unknown = get_args_parser().parse_known_args(argv)
    flags = (args.help, args.hydra_help, args.cfg, args.multirun, args.shell_completion, args.info,
             args.config_path, args.config_name, args.config_dir, args.experimental_rerun, unknown)
    if any(flags):
        return
    try:
        with warnings.catch_warnings():  # the real composition below warns once
            warnings.simplefilter("ignore")
            compose(args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def _describe_ds(cfg: Config) -> str:
    if not cfg.deepspeed.enabled:
        return "off"
    import json

    from mtp_occ.engine import deepspeed_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"ZeRO-{cfg.deepspeed.stage}, world {world} (set WORLD_SIZE to preview): " + json.dumps(
        deepspeed_config(cfg.algo, cfg.deepspeed, world))


def check_data(cfg: Config) -> str:
    """Read every data file the run will read, as the run reads it (training prompts, then each evaluation
    benchmark), so that a dry run fails where the run would; hub sources are named, not fetched."""
    from mtp_occ.data import build_prompts
    from mtp_occ.eval.policy import build_benchmarks
    from mtp_occ.tasks import task_for

    if cfg.data.source == "hub":
        prompts = f"hub {cfg.data.hub_id} (not fetched by a dry run)"
    elif task_for(cfg.data) is not None:
        prompts = f"task {cfg.data.source} (generated)"
    else:
        prompts = f"{len(build_prompts(cfg.data, cfg.data.seed))} prompts"
    if not cfg.eval.enabled:
        return f"{prompts}; eval off"
    if cfg.eval.hub:
        return f"{prompts}; eval benchmarks from the hub (not fetched by a dry run)"
    return f"{prompts}; eval " + ", ".join(f"{b.name} {len(b.problems)}" for b in build_benchmarks(cfg.eval, cfg.data))


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
        try:
            print(f"{'data':<18} {check_data(cfg)}")
        except (ConfigError, BenchmarkDataError, FileNotFoundError) as e:  # what the run would fail on
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(describe_memory(cfg))
        return None
    from mtp_occ.checkpoint import CheckpointWriteError
    from mtp_occ.train import train

    try:
        out = train(cfg, list(HydraConfig.get().overrides.task))
    except (ConfigError, BenchmarkDataError, CheckpointWriteError) as e:  # machine, data or disk: no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    k = cfg.eval.k
    print(f"\n== {cfg.name} finished in {out['seconds'] / 60:.1f} min ==")
    print(f"base  avg@{k}: {_fmt_eval(out['base_eval'])}")
    print(f"final avg@{k}: {_fmt_eval(out['final_eval'])}")
    print(f"run dir: {out['run_dir']}")
    final = out["final_eval"]
    return final["average"]["avg"] if final else None


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
