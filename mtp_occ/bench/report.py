"""The report: machine description, the flat result keys with their meanings (`EXPLAIN`), results.json
assembly, results.md and the printed table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from mtp_occ.bench.common import REGIMES, median


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": list(os.getloadavg())}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


# ------------------------------------------------------------------------------------------------ report

EXPLAIN = {
    "occ_over_detach": "update phase, occ ÷ detach (same batch; paper, whole step: 8.07/8.11 = 0.995)",
    "policy_over_detach": "update phase, policy ÷ detach",
    "ce_over_detach": "update phase, ce ÷ detach",
    "diag_over_detach": "update phase, occ + exact c, v² (diagnose=True) ÷ detach (paper: 45.06/8.11 = 5.6)",
    "occ_over_detach_step": "whole step (rollouts + grading + old log-probs + update), occ ÷ detach",
    "policy_over_detach_step": "whole step, policy ÷ detach",
    "ce_over_detach_step": "whole step, ce ÷ detach",
    "diag_over_detach_step": "whole step, occ with exact diagnostics ÷ detach",
    "detach_update_s": "seconds, detach update phase (absolute: machine-dependent)",
    "detach_step_s": "seconds, detach whole step (absolute: machine-dependent)",
    "trl_speedup": "TRL GRPOTrainer s/step ÷ our detach s/step (> 1: ours faster)",
    "trl_speedup_occ": "TRL s/step ÷ our occ s/step (ours also trains the MTP layer)",
    "trl_tokens_per_s": "TRL generated tokens per second of whole step",
    "ours_tokens_per_s": "ours (detach), generated tokens per second of whole step",
    "reward_pool_speedup": "math-verify verdicts/s, GradingPool(2 workers) ÷ serial in-process",
    "reward_pool1_speedup": "GradingPool(1 worker) ÷ serial in-process (the pool's IPC cost)",
    "serial_verdicts_per_s": "math-verify verdicts/s, serial in-process",
    "pool_recovery_s": "seconds from submitting 9^{9^{9^{9}}} (budget: configs.hostile_timeout_s) to the "
                       "pool's next ordinary verdict",
    "rollout_tokens_per_s": "HF generate on CPU, generated tokens per second (batch P·G)",
}


def assemble(reg: dict, trl: dict, rew: dict, gpu: dict, machine: dict, overrides: list[str], args) -> dict:
    """The flat result keys plus machine, configs and the raw timings under `details`."""
    ur, sr = reg["update_ratio"], reg["step_ratio"]
    phases = {k: median([p[k] for p in reg["phases"]["detach"]])
              for k in ("generate_s", "grade_s", "old_logprob_s", "update_s", "step_s")}
    all_phases = [p for ps in reg["phases"].values() for p in ps]
    res = {**{f"{k}_over_detach": ur[k] for k in ("occ", "policy", "ce", "diag")},
           **{f"{k}_over_detach_step": sr[k] for k in ("occ", "policy", "ce", "diag")},
           "detach_update_s": median(reg["update_s"]["detach"]), "detach_step_s": median(reg["step_s"]["detach"]),
           "rollout_tokens_per_s": median([p["tokens"] / p["generate_s"] for p in all_phases])}
    if "speedup" in trl:
        res.update({"trl_speedup": trl["speedup"], "trl_speedup_occ": trl["speedup_occ"],
                    "trl_s_per_step": trl["trl_per_step"], "ours_detach_s_per_step": trl["detach_per_step"],
                    "ours_occ_s_per_step": trl["occ_per_step"], "trl_tokens_per_s": trl["trl_tokens_per_s"],
                    "ours_tokens_per_s": trl["detach_tokens_per_s"]})
    else:
        res.update({"trl_speedup": None, "trl_error": trl.get("error") or trl.get("skipped")})
    res.update({"reward_pool_speedup": rew["pool_speedup"], "reward_pool1_speedup": rew["pool1_speedup"],
                "serial_verdicts_per_s": rew["serial_verdicts_per_s"],
                "pool_verdicts_per_s": rew["pool2_verdicts_per_s"], "pool_recovery_s": rew["recovery_s"]})
    res["machine"] = {**machine, "loadavg_end": list(os.getloadavg()), "threads_end": torch.get_num_threads()}
    res["configs"] = {"overrides": overrides, "regime_overrides": {r: [*overrides, f"regime={r}"] for r in REGIMES},
                      "diag": "regime=occ with rl_update(..., diagnose=True)",
                      "trl_grpo_config": trl.get("config"), "rounds": reg["rounds_done"], "warmup_rounds": args.warmup,
                      "trl_cycles_measured": trl.get("cycles_measured"), "reward_items": rew["items"],
                      "reward_reps": len(rew["seconds"]["serial"]), "budget_min": args.budget_min,
                      "hostile_timeout_s": rew["hostile_timeout_s"], "quick": args.quick,
                      "trl_note": "TRL trains the plain LM (no MTP layer); our occ step also trains the MTP layer"}
    res["gpu"] = gpu
    res["details"] = {"regimes": {k: reg[k] for k in ("update_s", "step_s", "batch_rows", "batch_tokens",
                                                      "update_ratio", "step_ratio", "update_ratio_quartiles",
                                                      "step_ratio_quartiles")},
                      "phases_detach_median_s": phases, "trl": {k: v for k, v in trl.items() if k != "config"},
                      "rewards": rew}
    return res


def fmt(v) -> str:
    if not isinstance(v, float):
        return "n/a" if v is None else str(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}"


def table_rows(res: dict) -> list[tuple[str, str, str]]:
    """(key, value, meaning); a regime ratio's value carries its quartiles over rounds: 1.005 (0.98–1.03)."""
    reg = res["details"]["regimes"]
    quart = {f"{k}_over_detach{sfx}": q for sfx, qs in (("", reg["update_ratio_quartiles"]),
                                                        ("_step", reg["step_ratio_quartiles"])) for k, q in qs.items()}
    return [(k, fmt(res[k]) + (f" ({quart[k][0]:.2f}–{quart[k][1]:.2f})" if k in quart else ""), EXPLAIN[k])
            for k in EXPLAIN if k in res]


def write_markdown(res: dict, path: Path) -> None:
    m, c, ph = res["machine"], res["configs"], res["details"]["phases_detach_median_s"]
    lines = ["# mtp_occ benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, torch threads={m['threads']}, "
             f"load average {m['loadavg_start'][0]:.2f} → {m['loadavg_end'][0]:.2f}. "
             f"Every ratio is the median of within-round ratios over interleaved rounds of one run "
             f"(`python -m mtp_occ.bench`): {c['rounds']} regime rounds after {c['warmup_rounds']} warm-up, "
             f"{c['trl_cycles_measured'] or 0} TRL cycles, {c['reward_reps']} reward repetitions; the order "
             "of the regimes rotates from round to round. In brackets: the quartiles of the per-round ratios "
             "(the noise).", "",
             "| figure | value | meaning |", "|---|---|---|",
             *(f"| `{k}` | {v} | {e} |" for k, v, e in table_rows(res))]
    if res.get("trl_error"):
        lines.append(f"| `trl_error` | | {res['trl_error']} |")
    rew = res["details"]["rewards"]
    lines += ["", "Where a detach step's time goes (median s, share of the step): " +
              ", ".join(f"{k.removesuffix('_s')} {v:.3f} ({v / ph['step_s']:.0%})" for k, v in ph.items()
                        if k != "step_s") + f"; step {ph['step_s']:.3f}.", "",
              f"Hostile item: timed out {rew['hostile_timed_out']}, worker killed and replaced "
              f"{rew['hostile_worker_replaced']}, budget {rew['hostile_timeout_s']} s.", "",
              f"GPU: {json.dumps(res['gpu'])[:300]}", "",
              "Overrides: `" + " ".join(res["configs"]["overrides"]) + "`. TRL trains the plain LM without "
              "the MTP layer; its GRPOConfig is in results.json (`configs.trl_grpo_config`).", ""]
    path.write_text("\n".join(lines))


def print_table(res: dict) -> None:
    rows = table_rows(res)
    w = max(len(k) for k, _, _ in rows)
    print("\n" + "\n".join(f"{k:<{w}}  {v:>20}  {e}" for k, v, e in rows))
    if res.get("trl_error"):
        print(f"{'trl_error':<{w}}  {res['trl_error']}")
