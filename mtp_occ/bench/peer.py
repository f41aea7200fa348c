"""Section 3: the peer, TRL's `GRPOTrainer`, on the same base weights, prompts and hyper-parameters,
alternating cycle by cycle with our detach and occ steps. TRL, datasets and transformers are imported
inside `bench_trl`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from time import perf_counter

import torch

from mtp_occ.bench.common import MIN_REPS, median
from mtp_occ.bench.step import fresh, full_step

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
    """TRL GRPOTrainer vs our detach and occ steps, alternating cycle by cycle (see the `mtp_occ.bench`
    docstring); training stops after `stop_at` (perf_counter) once `MIN_REPS` cycles are measured (plus the
    warm-up)."""
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
