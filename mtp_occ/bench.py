"""Speed benchmark: what OCC costs over Detach, what the exact diagnostics cost, how our loop compares with
TRL's `GRPOTrainer`, and how fast rewards and rollouts are. Every figure is a RATIO of two timings taken in
one run on one machine, so it transfers across machines better than the seconds behind it.

Run it: `python -m mtp_occ.bench --out bench/results.json` (`make bench`; ~3-5 min on 2 CPU cores, with a
soft 12 min budget that trims repetitions on a loaded machine; one torch thread by default, see
bench/README.md for why);
`--quick` for a smoke run on tiny sizes (the tests), `--with-trl` to include TRL in a quick run.

What it measures (all on the embedded task's tiny model, MTP-pre-trained for `model.pretrain.steps=200`,
cached under `$MTP_OCC_CACHE`, default `bench/cache.tmp`; one prompt batch, one seed):
1. Regimes. Each round times, for detach, ce, policy, occ and "diag" (occ with `diagnose=True`), (a) the
   update phase: `rl_update` on ONE shared rollout batch (same old log-probs and advantages) from a fresh
   copy of the base model and optimizer, and (b) a whole step from a fresh copy: rollouts (HF generate)
   + grading + old log-probs + `rl_update`, i.e. the body of `train()` minus logging and checkpoints
   (the rollouts are identical across regimes: same weights, same seeds). The regimes alternate inside
   every round (detach, ce, policy, occ, diag; the next round rotated by one, so that none always runs
   first while the load drifts); a ratio is taken within each round and the median over rounds is
   reported (`occ_over_detach` = update phase, `occ_over_detach_step` = whole step), with its quartiles.
2. `diag_over_detach`: the exact decomposition c = <g_RL, g_MTP>, v² (one extra backward per micro-batch,
   on every update but the first) against a detach update.
3. Peer: TRL's `GRPOTrainer` on the same base weights (`model.lm` saved with `save_pretrained`, without the
   MTP layer: TRL trains the plain LM), the same prompts in the same order, group size, completion length,
   temperature, clipping, learning rate and 4 optimizer updates per generation batch
   (`steps_per_generation=4`, `num_iterations=1`), rewarded by the same last-\\boxed{} exact match. One of
   our RL steps = one TRL generation cycle = 4 TRL optimizer steps. Our detach and occ steps run inside a
   TRL callback after each TRL cycle, so the three alternate in time; the first cycle of each is warm-up.
   `trl_speedup` = TRL s/step ÷ our detach s/step (`trl_speedup_occ`: ÷ our occ s/step, which also trains
   the MTP layer through the policy loss).
4. Rewards: math-verify verdicts/s, serial (`grade_one` in this process) vs `GradingPool(workers=2)` (what
   `grade(..., workers=2)` uses), on 400 completions built from MATH-500 gold answers (right, wrong,
   no box, garbage in the box); and `pool_recovery_s`: from submitting `\\boxed{9^{9^{9^{9}}}}` with a
   1 s budget to the next ordinary verdict from the same pool (the budget when the worker's own timer
   stops the item, budget + grace + kill + respawn when the parent has to kill the worker).
5. `rollout_tokens_per_s`: generated tokens / `generate` seconds in the whole steps of (1). With CUDA, a
   GPU section (HF vs vLLM tokens/s, MTP speculative decoding on/off, training tokens/s and MFU); without
   it the section is recorded as skipped.

How it departs from the paper's measurement (DESIGN §1.3: OCC 8.07 s/step, Detach 8.11 s, exact gradient
inner products 45.06 s on MiMo-7B with verl): a 2-layer d=64 model on CPU, where per-op overhead and
attention dominate and rollouts are short, instead of a 7B model on GPUs where generation dominates the
step; so the update-phase ratios are the stricter test (a whole step dilutes them with rollout time).
Our diagnostics reuse the step's graph (one extra backward), while the paper ran separate backward passes.
No timed assertion exists anywhere: the numbers are reported, never checked.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from time import perf_counter

import torch

REPO = Path(__file__).resolve().parent.parent
REGIMES = ("detach", "ce", "policy", "occ")
VARIANTS = (*((r, r, False) for r in REGIMES), ("diag", "occ", True))  # (label, regime, diagnose)
HOSTILE = "\\boxed{9^{9^{9^{9}}}}"
MIN_REPS = 3  # repetitions every section keeps even when it runs past its share of the time budget

FULL = {"overrides": ["model.pretrain.steps=200", "wandb.mode=disabled", "eval.enabled=false"],
        "rounds": 10, "warmup": 1, "trl_cycles": 8, "reward_items": 400, "reward_reps": 3, "hostile_timeout_s": 1.0,
        "budget_min": 12.0}
QUICK = {"overrides": ["model.pretrain.steps=20", "data.n_terms=2", "data.min_operand=1", "data.max_operand=9",
                       "data.heldout_size=64", "algo.prompts_per_step=4", "algo.group_size=4",
                       "algo.updates_per_step=2", "rollout.max_new_tokens=12", "wandb.mode=disabled",
                       "eval.enabled=false"],
         "rounds": 1, "warmup": 0, "trl_cycles": 1, "reward_items": 24, "reward_reps": 1, "hostile_timeout_s": 0.5,
         "budget_min": 0.0}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


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


# ------------------------------------------------------------------------------------- our training step


def rollout(cfg, model, tok, prompts, step: int):
    """`train.collect_rollouts` with the HF backend (`mtp_occ.rollout.HFRollout` is this `generate`) and
    without dynamic sampling (off in the tiny preset), timed in two parts:
    prompts [(step-1)·P, step·P) of the (unshuffled, unbounded) arith stream, graded, rewards shaped."""
    from mtp_occ.eval.templates import format_prompt
    from mtp_occ.rewards import grade
    from mtp_occ.rl.grpo import overlong_penalty
    from mtp_occ.rollout.hf import generate
    from mtp_occ.train import step_seed

    a, r, G = cfg.algo, cfg.rollout, cfg.algo.group_size
    idx = list(range((step - 1) * a.prompts_per_step, step * a.prompts_per_step))
    items = [prompts[i] for i in idx]
    t0 = perf_counter()
    batch = generate(model.lm, tok, [format_prompt(p.problem, cfg.data.template, tok) for p in items], G,
                     temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                     max_prompt_len=r.max_prompt_len, batch_size=r.batch_size, seed=step_seed(cfg.seed, step, 0),
                     add_special_tokens=cfg.data.template == "plain",
                     row_keys=(torch.tensor(idx).unsqueeze(1) * G + torch.arange(G)).reshape(-1))
    t1 = perf_counter()
    verdicts = grade(batch.completions, [p.answer for p in items for _ in range(G)], grader=cfg.reward.grader,
                     timeout_s=cfg.reward.timeout_s, extract=cfg.reward.extract, workers=cfg.reward.workers or None)
    reward_B = torch.tensor([v.score for v in verdicts]) + overlong_penalty(
        batch.response_len_B, r.max_new_tokens, a.overlong_buffer, a.overlong_factor)
    times = {"generate_s": t1 - t0, "grade_s": perf_counter() - t1, "tokens": int(batch.response_len_B.sum()),
             "seq_tokens": int(batch.attention_mask_BT.sum())}
    return batch, reward_B, times


def update(cfg, model, engine, regime, batch, old_BT, adv_B, step: int, diagnose: bool):
    """`rl_update` as `train()` calls it."""
    from mtp_occ.schedules import build_schedule
    from mtp_occ.update import rl_update

    return rl_update(model, engine, regime, batch, old_BT, adv_B, cfg.algo,
                     coef_scale=build_schedule(cfg.coef_schedule)((step - 1) / cfg.steps),
                     temperature=cfg.rollout.temperature, group_size=cfg.algo.group_size, diagnose=diagnose)


def full_step(cfg, model, tok, engine, regime, prompts, step: int, diagnose: bool = False) -> dict:
    """One RL step, the body of `train()`'s loop minus logging/checkpoints; returns its phase times."""
    from mtp_occ.rl.grpo import group_advantages
    from mtp_occ.update import old_logprobs

    t0 = perf_counter()
    batch, reward_B, times = rollout(cfg, model, tok, prompts, step)
    adv_B = group_advantages(reward_B, cfg.algo.group_size, cfg.algo.norm_std, cfg.algo.adv_eps).to(
        batch.input_ids_BT.device)
    t1 = perf_counter()
    old_BT = old_logprobs(model, batch, cfg.algo.micro_batch_size, cfg.rollout.temperature)
    t2 = perf_counter()
    update(cfg, model, engine, regime, batch, old_BT, adv_B, step, diagnose)
    t3 = perf_counter()
    return {**times, "old_logprob_s": t2 - t1, "update_s": t3 - t2, "step_s": t3 - t0}


def fresh(cfg, base):
    """An identical starting point for every timing: a copy of the base model, a new engine (optimizer)
    and regime, as `train()` builds them for one process."""
    from mtp_occ.engine import build_engine
    from mtp_occ.regimes import build_regime

    model = copy.deepcopy(base)
    return model, build_engine(model, cfg, 1), build_regime(cfg.regime)


# ------------------------------------------------------------------------------------------- 1 + 2 regimes


def round_ratios(times: dict[str, list[float]], ref: str = "detach") -> dict[str, float]:
    """Median over rounds of t[label] / t[ref] within the same round."""
    return {k: median([t / r for t, r in zip(v, times[ref], strict=True)]) for k, v in times.items() if k != ref}


def ratio_spread(times: dict[str, list[float]], ref: str = "detach") -> dict[str, list[float]]:
    """[lower, upper] quartile over rounds of the within-round ratios: the noise behind each median."""
    out = {}
    for k, v in times.items():
        r = sorted(t / x for t, x in zip(v, times[ref], strict=True))
        if k != ref and r:
            out[k] = [r[len(r) // 4], r[(3 * len(r)) // 4]] if len(r) >= 4 else [r[0], r[-1]]
    return out


def rotated(variants: tuple, rnd: int) -> tuple:
    """Round `rnd`'s order: the variants rotated by `rnd`, so none always runs first (load drifts)."""
    k = rnd % len(variants)
    return variants[k:] + variants[:k]


def bench_regimes(cfgs: dict, base, tok, prompts, rounds: int, warmup: int, stop_at: float) -> dict:
    """Interleaved rounds of update-phase and whole-step timings for every variant (see module doc);
    no new round starts after `stop_at` (perf_counter) once `MIN_REPS` rounds are done."""
    from mtp_occ.rl.grpo import group_advantages
    from mtp_occ.update import old_logprobs

    c0 = cfgs["detach"]
    batch, reward_B, _ = rollout(c0, base, tok, prompts, step=1)
    adv_B = group_advantages(reward_B, c0.algo.group_size, c0.algo.norm_std, c0.algo.adv_eps)
    old_BT = old_logprobs(base, batch, c0.algo.micro_batch_size, c0.rollout.temperature)
    upd = {label: [] for label, _, _ in VARIANTS}
    step = {label: [] for label, _, _ in VARIANTS}
    phases = {label: [] for label, _, _ in VARIANTS}
    for rnd in range(-warmup, rounds):
        for label, name, diag in rotated(VARIANTS, rnd):
            model, opt, regime = fresh(cfgs[name], base)
            t = perf_counter()
            update(cfgs[name], model, opt, regime, batch, old_BT, adv_B, 1, diag)
            if rnd >= 0:
                upd[label].append(perf_counter() - t)
        for label, name, diag in rotated(VARIANTS, rnd):
            model, opt, regime = fresh(cfgs[name], base)
            ph = full_step(cfgs[name], model, tok, opt, regime, prompts, 1, diag)
            if rnd >= 0:
                step[label].append(ph["step_s"])
                phases[label].append(ph)
        if rnd >= 0:
            print(f"  regimes round {rnd + 1}/{rounds}: update", " ".join(f"{k}={v[-1]:.3f}" for k, v in upd.items()),
                  "| step", " ".join(f"{k}={v[-1]:.3f}" for k, v in step.items()), flush=True)
        if rnd + 1 >= MIN_REPS and perf_counter() > stop_at:
            print(f"  time budget: stopping after {rnd + 1} rounds", flush=True)
            break
    return {"rounds_done": len(upd["detach"]), "update_s": upd, "step_s": step, "phases": phases, "batch_rows": len(batch),
            "batch_tokens": int(batch.response_len_B.sum()), "update_ratio": round_ratios(upd),
            "step_ratio": round_ratios(step), "update_ratio_quartiles": ratio_spread(upd),
            "step_ratio_quartiles": ratio_spread(step)}


# ------------------------------------------------------------------------------------------------ 3 peer


def trl_reward(completions, answer, **_):
    """The same grading as `reward=exact`: the last \\boxed{} against the integer answer."""
    from mtp_occ.rewards import exact_equal, extract_boxed

    return [float((p := extract_boxed(c)) is not None and exact_equal(p, a)) for c, a in zip(completions, answer, strict=True)]


def trl_config(cfg, out_dir: str, cycles: int) -> dict:
    """GRPOConfig kwargs matching our step: P·G completions per generation, `updates_per_step` updates."""
    a, r = cfg.algo, cfg.rollout
    return {"output_dir": out_dir, "use_cpu": not torch.cuda.is_available(), "seed": cfg.seed,
            "per_device_train_batch_size": a.prompts_per_step * a.group_size // a.updates_per_step,
            "gradient_accumulation_steps": 1, "steps_per_generation": a.updates_per_step, "num_iterations": 1,
            "num_generations": a.group_size, "max_completion_length": r.max_new_tokens, "temperature": r.temperature,
            "top_p": r.top_p, "top_k": r.top_k, "learning_rate": a.lr, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "weight_decay": a.weight_decay, "adam_beta1": a.betas[0], "adam_beta2": a.betas[1],
            "max_grad_norm": a.grad_clip, "beta": 0.0, "epsilon": a.clip_low, "epsilon_high": a.clip_high,
            "delta": a.dual_clip or None, "loss_type": "dapo", "scale_rewards": "group" if a.norm_std else "none",
            "mask_truncated_completions": False, "shuffle_dataset": False, "max_steps": a.updates_per_step * cycles,
            "logging_steps": 10**6, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "bf16": False, "dataloader_num_workers": 0}


def bench_trl(cfgs: dict, base, tok, prompts, cycles: int, stop_at: float) -> dict:
    """TRL GRPOTrainer vs our detach and occ steps, alternating cycle by cycle (see module doc); training
    stops after `stop_at` (perf_counter) once `MIN_REPS` cycles are measured (plus the warm-up)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    c0 = cfgs["detach"]
    P, updates = c0.algo.prompts_per_step, c0.algo.updates_per_step
    ours = {name: fresh(cfgs[name], base) for name in ("detach", "occ")}
    rec = {"trl_s": [], "trl_tokens": [], "detach_s": [], "detach_tokens": [], "occ_s": [], "occ_tokens": []}
    generated = []

    def reward(completions, answer, completion_ids, **kw):
        generated.extend(len(c) for c in completion_ids)
        return trl_reward(completions, answer)

    class Interleave(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.last, self.acc = perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kw):
            self.acc += perf_counter() - self.last
            if state.global_step % updates == 0:
                k = state.global_step // updates  # the TRL cycle just finished used the prompts of our step k
                rec["trl_s"].append(self.acc)
                rec["trl_tokens"].append(sum(generated))
                generated.clear()
                for name, (model, opt, regime) in ours.items():
                    ph = full_step(cfgs[name], model, tok, opt, regime, prompts, k)
                    rec[f"{name}_s"].append(ph["step_s"])
                    rec[f"{name}_tokens"].append(ph["tokens"])
                print(f"  trl cycle {k}/{cycles}: trl={rec['trl_s'][-1]:.3f}s detach={rec['detach_s'][-1]:.3f}s "
                      f"occ={rec['occ_s'][-1]:.3f}s", flush=True)
                self.acc = 0.0
                if k >= MIN_REPS + 1 and perf_counter() > stop_at:
                    print(f"  time budget: stopping TRL after {k} cycles", flush=True)
                    control.should_training_stop = True
            self.last = perf_counter()

    with tempfile.TemporaryDirectory(prefix="mtp_occ_bench_trl_") as d:
        base.lm.save_pretrained(d)
        tok.save_pretrained(d)
        rows = [{"prompt": prompts[i].problem, "answer": prompts[i].answer} for i in range(P * cycles)]
        kwargs = trl_config(c0, str(Path(d) / "out"), cycles)
        ttok = AutoTokenizer.from_pretrained(d)
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
                              reward_funcs=reward, args=GRPOConfig(**kwargs), train_dataset=Dataset.from_list(rows),
                              processing_class=ttok, callbacks=[Interleave()])
        trainer.train()
    skip = 1 if cycles > 1 else 0  # the first cycle of each is warm-up
    m = {k: v[skip:] for k, v in rec.items()}
    out = {f"{k}_per_step": median(m[f"{k}_s"]) for k in ("trl", "detach", "occ")}
    out.update({f"{k}_tokens_per_s": median([t / s for t, s in zip(m[f"{k}_tokens"], m[f"{k}_s"], strict=True)])
                for k in ("trl", "detach", "occ")})
    out["speedup"] = median([t / s for t, s in zip(m["trl_s"], m["detach_s"], strict=True)])
    out["speedup_occ"] = median([t / s for t, s in zip(m["trl_s"], m["occ_s"], strict=True)])
    out["cycles_measured"] = len(m["trl_s"])
    out["raw"] = rec
    out["config"] = {k: v for k, v in kwargs.items() if k != "output_dir"}
    return out


# --------------------------------------------------------------------------------------------- 4 rewards


def reward_items(n: int) -> tuple[list[str], list[str], str]:
    """`n` (completion, gold) pairs cycling right / wrong / no box / garbage-in-the-box over MATH-500."""
    from mtp_occ.eval.benchmarks import default_data_dir, load_jsonl

    probs = load_jsonl(default_data_dir() / "math500.jsonl")
    comps, golds = [], []
    for i in range(n):
        p, other = probs[i % len(probs)], probs[(i * 7 + 3) % len(probs)]
        body = f"Let me think step by step. {p.problem[:160]} ... "
        kind = i % 4
        ans = {0: f"so the answer is \\boxed{{{p.answer}}}", 1: f"so the answer is \\boxed{{{other.answer}}}",
               2: "so the answer is probably 42.", 3: "\\boxed{\\frac{)(}{+} = \\sqrt[}"}[kind]
        comps.append(body + ans)
        golds.append(p.answer)
    return comps, golds, "math500 (right / wrong / no box / garbage, cycling)"


def bench_rewards(n: int, reps: int, hostile_timeout_s: float, stop_at: float) -> dict:
    """Serial in-process math-verify vs 1- and 2-worker pools (interleaved reps), and hostile-item recovery."""
    from mtp_occ.rewards import GradingPool, grade_one

    comps, golds, source = reward_items(n)
    grade_one("\\boxed{1/2}", "\\frac{1}{2}")  # import + warm math-verify, as pool workers do before their clock
    t = {"serial": [], "pool1": [], "pool2": []}
    with GradingPool(workers=1) as pool1, GradingPool(workers=2) as pool2:
        pool1.start(), pool2.start()
        for rep in range(reps):
            if rep and perf_counter() > stop_at:
                break
            t0 = perf_counter()
            serial = [grade_one(c, g, "math_verify", "boxed", 2.0) for c, g in zip(comps, golds, strict=True)]
            t["serial"].append(perf_counter() - t0)
            for name, pool in (("pool1", pool1), ("pool2", pool2)):
                t0 = perf_counter()
                pooled = pool.grade(comps, golds, "math_verify", "boxed", 2.0)
                t[name].append(perf_counter() - t0)
        agree = sum(a.score == b.score for a, b in zip(serial, pooled, strict=True)) / n
        pids = [w.process.pid for w in pool2._workers]  # read-only peek: was a worker killed and replaced?
        t0 = perf_counter()
        hostile = pool2.grade([HOSTILE], ["1"], "math_verify", "boxed", hostile_timeout_s)[0]
        t1 = perf_counter()
        replaced = pids != [w.process.pid for w in pool2._workers]
        after = pool2.grade([comps[0]], [golds[0]], "math_verify", "boxed", 2.0)[0]
        t2 = perf_counter()
    return {"items": n, "source": source, "right_frac": sum(v.score for v in serial) / n, "serial_pool_agree": agree,
            "seconds": t, "serial_verdicts_per_s": n / median(t["serial"]),
            "pool1_verdicts_per_s": n / median(t["pool1"]), "pool2_verdicts_per_s": n / median(t["pool2"]),
            "pool_speedup": median([s / p for s, p in zip(t["serial"], t["pool2"], strict=True)]),
            "pool1_speedup": median([s / p for s, p in zip(t["serial"], t["pool1"], strict=True)]),
            "hostile_timeout_s": hostile_timeout_s, "hostile_timed_out": hostile.timeout,
            "hostile_call_s": t1 - t0, "hostile_worker_replaced": replaced,
            "hostile_error": hostile.error, "after_score": after.score, "recovery_s": t2 - t0}


# ------------------------------------------------------------------------------------------------- 5 GPU


def bench_gpu(overrides: list[str]) -> dict:
    """HF vs vLLM tokens/s, MTP speculative decoding, training tokens/s and MFU; CUDA only."""
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA", flush=True)
        return {"skipped": "no CUDA"}
    from mtp_occ.config import compose
    from mtp_occ.data import build_prompts
    from mtp_occ.model.load import build_policy

    cfg = compose([*overrides, "regime=detach"])
    base, tok, base_dir = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)
    base = base.cuda()
    prompts = build_prompts(cfg.data, cfg.data.seed)
    out: dict = {"device": torch.cuda.get_device_name(0), "overrides": overrides}
    rollout(cfg, base, tok, prompts, 1)  # warm-up
    hf = [rollout(cfg, base, tok, prompts, 1)[2] for _ in range(3)]
    out["hf_tokens_per_s"] = median([h["tokens"] / h["generate_s"] for h in hf])
    out.update(gpu_training(cfg, overrides, base, tok, prompts))
    out["vllm"] = gpu_vllm(cfg, str(base_dir or cfg.model.name_or_path), base, tok, prompts, out["hf_tokens_per_s"])
    return out


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # bf16 dense


def gpu_training(cfg, overrides, base, tok, prompts) -> dict:
    """Training tokens/s (real prompt + response tokens through forward + backward per update second)
    and MFU ≈ 6·N·tokens/s ÷ the device's bf16 dense peak (fp32 models: read it as a rough upper bound)."""
    from mtp_occ.config import compose

    res = {}
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(0)), None)
    n_params = sum(p.numel() for p in base.parameters())
    for name in ("detach", "occ"):
        c = compose([*overrides, f"regime={name}"])
        runs = []
        for _ in range(3):
            model, opt, regime = fresh(c, base)
            torch.cuda.synchronize()
            runs.append(full_step(c, model, tok, opt, regime, prompts, 1))
            torch.cuda.synchronize()
        tps = median([r["seq_tokens"] / r["update_s"] for r in runs])
        res[f"{name}_train_tokens_per_s"] = tps
        res[f"{name}_mfu"] = 6 * n_params * tps / (peak * 1e12) if peak else None
    res["mfu_peak_tflops"] = peak
    return res


def gpu_vllm(cfg, path: str, base, tok, prompts, hf_tps: float) -> dict:
    """Generated tokens/s of the project's vLLM backend (`mtp_occ.rollout.vllm`, which imports vllm
    lazily: GPU machines only) without and with MTP speculative decoding, plus one weight sync. The
    speculative run needs a model vLLM has an MTP drafter for (MiMo-layout checkpoints); otherwise its
    error is recorded."""
    try:
        import vllm  # noqa: F401  (only to tell "not installed" apart from a failing run)

        from mtp_occ.rollout.vllm import VllmRollout
    except ImportError as e:
        return {"skipped": f"vllm not importable ({e}); pip install -e '.[gpu]'"}
    a, r, P = cfg.algo, cfg.rollout, cfg.algo.prompts_per_step
    texts = [prompts[i].problem for i in range(P)]
    keys = torch.arange(P * a.group_size)
    res: dict = {}
    for label, spec in (("plain", False), ("mtp_spec", True)):
        try:
            engine = VllmRollout.start(path, dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                                       max_model_len=r.max_prompt_len + r.max_new_tokens, speculative_mtp=spec,
                                       seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
            t0 = perf_counter()
            engine.sync_weights(base)
            sync_s = perf_counter() - t0
            runs = []
            for rep in range(4):  # the first is warm-up
                t0 = perf_counter()
                batch, _ = engine.generate(tok, texts, a.group_size, temperature=r.temperature, top_p=r.top_p,
                                           top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                                           max_prompt_len=r.max_prompt_len, row_keys=keys, seed=cfg.seed + rep,
                                           add_special_tokens=cfg.data.template == "plain")
                runs.append(int(batch.response_len_B.sum()) / (perf_counter() - t0))
            res[label] = {"tokens_per_s": median(runs[1:]), "over_hf": median(runs[1:]) / hf_tps, "sync_s": sync_s,
                          **engine.metrics()}
            del engine
            torch.cuda.empty_cache()
        except Exception as e:  # report, never fake a number
            res[label] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return res


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


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mtp_occ.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json", help="results JSON (+ .md beside it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round, TRL skipped unless --with-trl")
    p.add_argument("--with-trl", action="store_true", help="run the TRL peer in --quick mode too")
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


def main(argv: list[str] | None = None) -> dict:
    from mtp_occ.config import compose
    from mtp_occ.data import build_prompts
    from mtp_occ.model.load import build_policy

    args = parse_args(argv)
    os.environ.setdefault("MTP_OCC_CACHE", str(REPO / "bench" / "cache.tmp"))
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, machine = perf_counter(), machine_info()
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
    gpu = bench_gpu(args.overrides + args.gpu_override)
    res = assemble(reg, trl, rew, gpu, machine, args.overrides, args)
    res["bench_seconds"] = perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    write_markdown(res, args.out.with_suffix(".md"))
    print_table(res)
    print(f"\n[bench] {res['bench_seconds']:.0f} s; wrote {args.out} and {args.out.with_suffix('.md')}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
