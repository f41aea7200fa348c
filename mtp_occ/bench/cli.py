"""The command line: `python -m mtp_occ.bench` (full and `--quick` presets, argument parsing) and `main`,
which runs every section in order within the soft time budget and writes results.json / results.md."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from time import perf_counter

import torch

from mtp_occ.bench.common import MIN_REPS, REGIMES, REPO
from mtp_occ.bench.gpu import bench_gpu
from mtp_occ.bench.grading import bench_rewards
from mtp_occ.bench.memory import EXPLAIN_MEMORY, bench_memory
from mtp_occ.bench.peer import bench_trl
from mtp_occ.bench.regimes import bench_regimes
from mtp_occ.bench.report import EXPLAIN, assemble, machine_info, print_table, write_markdown
from mtp_occ.bench.rollout_vllm import EXPLAIN_VLLM_CPU, bench_vllm_cpu

EXPLAIN.update(EXPLAIN_MEMORY)  # section 6's keys join the table
EXPLAIN.update(EXPLAIN_VLLM_CPU)  # and section 7's

FULL = {"overrides": ["model.pretrain.steps=200", "wandb.mode=disabled", "eval.enabled=false"],
        "rounds": 10, "warmup": 1, "trl_cycles": 8, "reward_items": 400, "reward_reps": 3, "hostile_timeout_s": 1.0,
        "budget_min": 12.0}
QUICK = {"overrides": ["model.pretrain.steps=20", "data.n_terms=2", "data.min_operand=1", "data.max_operand=9",
                       "data.heldout_size=64", "algo.prompts_per_step=4", "algo.group_size=4",
                       "algo.updates_per_step=2", "rollout.max_new_tokens=12", "wandb.mode=disabled",
                       "eval.enabled=false"],
         "rounds": 1, "warmup": 0, "trl_cycles": 1, "reward_items": 24, "reward_reps": 1, "hostile_timeout_s": 0.5,
         "budget_min": 0.0}


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import mtp_occ.bench as package  # the description: the package docstring's first paragraph

    p = argparse.ArgumentParser(prog="python -m mtp_occ.bench", description=package.__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="results JSON (+ .md beside it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, TRL skipped unless --with-trl")
    p.add_argument("--with-trl", action="store_true", help="run the TRL peer in --quick mode too")
    p.add_argument("--with-vllm", action="store_true", help="run the vLLM CPU-build rollout section in --quick mode too")
    p.add_argument("--vllm-only", action="store_true",
                   help="only the vLLM CPU-build rollout section, merged into an existing --out")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL peer")
    p.add_argument("--rounds", type=int, help="interleaved regime rounds (after warm-up)")
    p.add_argument("--trl-cycles", type=int, help="TRL generation cycles (the first is warm-up)")
    p.add_argument("--reward-items", type=int)
    p.add_argument("--reward-reps", type=int)
    p.add_argument("--budget-min", type=float, help="soft time budget in minutes: sections stop repeating (keeping "
                   f"at least {MIN_REPS} repetitions) past their share of it; 0 = none (default: 12, --quick: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared "
                   "machine, see bench/README.md); 0 = torch's default")
    p.add_argument("--override", action="append", default=[], help="extra config override (repeatable)")
    p.add_argument("--gpu-override", action="append", default=[], help="extra override for the GPU section")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory section (log-prob peaks, micro-batching), merged into an existing --out")
    p.add_argument("--gpu-only", action="store_true",
                   help="only the GPU section (tests/gpu/run_gpu_checks.sh); exits 1 when it cannot run")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key in ("rounds", "trl_cycles", "reward_items", "reward_reps", "budget_min"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.warmup, args.hostile_timeout_s = preset["warmup"], preset["hostile_timeout_s"]
    args.overrides = [*preset["overrides"], *args.override]
    return args


def run_trl(args, cfgs, base, tok, prompts, stop_at: float) -> dict:
    if args.no_trl or (args.quick and not args.with_trl):
        return {"skipped": "--quick without --with-trl" if not args.no_trl else "--no-trl"}
    try:
        import trl  # noqa: F401
    except ImportError as e:
        return {"error": f"trl not installed ({e}): pip install trl"}
    try:
        return bench_trl(cfgs, base, tok, prompts, args.trl_cycles + (1 if args.trl_cycles > 1 else 0), stop_at)
    except Exception as e:  # record why, never fake a number
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def _one_section(args, machine: dict, t0: float, name: str, flat: dict, details: dict) -> dict:
    """One section's figures merged into the results file at `--out` (when it exists) and its table; the
    other figures stay as they were (from their own, earlier run: compare ratios within a section only)."""
    res = json.loads(args.out.read_text()) if args.out.exists() else {}
    res.update(flat)
    res.setdefault("details", {})[name] = details
    res[f"machine_{name}_section"] = machine
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    if "regimes" in res["details"]:
        write_markdown(res, args.out.with_suffix(".md"))
    print(json.dumps(flat, indent=1))
    print(f"\n[bench] {name} section {perf_counter() - t0:.0f} s; wrote {args.out}")
    return res


def main(argv: list[str] | None = None) -> dict:
    from mtp_occ.config import compose
    from mtp_occ.data import build_prompts
    from mtp_occ.policy import build_policy

    args = parse_args(argv)
    os.environ.setdefault("MTP_OCC_CACHE", str(REPO / "bench" / "cache.tmp"))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, machine = perf_counter(), machine_info()
    if args.memory_only:
        mem = bench_memory(args.quick)
        return _one_section(args, machine, t0, "memory", mem["flat"], mem["details"])
    if args.vllm_only:
        vllm_cpu = bench_vllm_cpu(args.overrides)
        return _one_section(args, machine, t0, "rollout_vllm_cpu", {"vllm_cpu_over_hf": vllm_cpu.get("vllm_over_hf")},
                            vllm_cpu)
    if args.gpu_only:
        res = {"machine": machine, "gpu": bench_gpu(args.overrides + args.gpu_override),
               "bench_seconds": perf_counter() - t0}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps(res["gpu"], indent=1, default=str))
        if "skipped" in res["gpu"]:
            raise SystemExit(f"GPU section not run: {res['gpu']['skipped']}")
        return res
    budget = args.budget_min * 60 or float("inf")
    share = {"regimes": t0 + 0.45 * budget, "trl": t0 + 0.8 * budget, "rewards": t0 + 0.95 * budget}
    cfgs = {name: compose([*args.overrides, f"regime={name}"]) for name in REGIMES}
    torch.manual_seed(cfgs["detach"].seed)
    base, tok, _ = build_policy(cfgs["detach"].model, cfgs["detach"].data, cfgs["detach"].seed)
    prompts = build_prompts(cfgs["detach"].data, cfgs["detach"].seed)
    print(f"[bench] base ready after {perf_counter() - t0:.0f} s; regimes ({args.rounds} rounds)", flush=True)
    reg = bench_regimes(cfgs, base, tok, prompts, args.rounds, args.warmup, share["regimes"])
    print(f"[bench] {perf_counter() - t0:.0f} s; TRL peer", flush=True)
    trl = run_trl(args, cfgs, base, tok, prompts, share["trl"])
    print(f"[bench] {perf_counter() - t0:.0f} s; rewards", flush=True)
    rew = bench_rewards(args.reward_items, args.reward_reps, args.hostile_timeout_s, share["rewards"])
    print(f"[bench] {perf_counter() - t0:.0f} s; memory", flush=True)
    mem = bench_memory(args.quick)
    gpu = bench_gpu(args.overrides + args.gpu_override)
    res = assemble(reg, trl, rew, gpu, machine, args.overrides, args)
    vllm_cpu = ({"skipped": "--quick without --with-vllm"} if args.quick and not args.with_vllm
                else bench_vllm_cpu(args.overrides))
    res["vllm_cpu_over_hf"] = vllm_cpu.get("vllm_over_hf")  # None when skipped: details say why
    res["details"]["rollout_vllm_cpu"] = vllm_cpu
    res.update(mem["flat"])
    res["details"]["memory"] = mem["details"]
    res["bench_seconds"] = perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    write_markdown(res, args.out.with_suffix(".md"))
    print_table(res)
    print(f"\n[bench] {res['bench_seconds']:.0f} s; wrote {args.out} and {args.out.with_suffix('.md')}")
    return res
