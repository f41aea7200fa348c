"""Evaluate a policy with the settings of a run config: the glue between `Config`, the model's
generation and `mtp_occ.eval.runner.evaluate`. Used at the end of training (and every `eval_every`
steps) and by `python -m mtp_occ.eval`.

Benchmark "arith" is the embedded task's held-out set (generated from the data config's seed, disjoint
from the training stream); the six math benchmarks come from local jsonl files or the hub.
"""

from __future__ import annotations

from pathlib import Path

from mtp_occ.config import Config
from mtp_occ.eval.benchmarks import Benchmark, Problem, load_benchmark


def build_benchmarks(cfg: Config) -> list[Benchmark]:
    out = []
    for name in cfg.eval.benchmarks:
        if name == "arith":
            from mtp_occ.tasks.arith import ArithTask

            d = cfg.data
            task = ArithTask(d.n_terms, d.min_operand, d.max_operand, d.heldout_size, d.seed)
            probs = [Problem(p.id, p.prompt, p.answer, "arith") for p in task.heldout]
            out.append(Benchmark("arith", probs[: cfg.eval.limit] if cfg.eval.limit else probs))
        else:
            out.append(load_benchmark(name, cfg.eval.data_dir or None, hub=cfg.eval.hub, limit=cfg.eval.limit))
    return out


def make_generate_fn(model, tokenizer, cfg: Config, seed: int):
    """`generate_fn(prompts, n)` with the eval sampling settings (HF backend)."""
    from mtp_occ.rollout.hf import generate

    e = cfg.eval
    # chat-formatted prompts already carry their special tokens
    add_special = e.template == "plain" or not getattr(tokenizer, "chat_template", None)

    def generate_fn(prompts: list[str], n: int) -> list[list[str]]:
        batch = generate(model.lm, tokenizer, prompts, n, temperature=e.temperature, top_p=e.top_p,
                         max_new_tokens=e.max_new_tokens, max_prompt_len=cfg.rollout.max_prompt_len,
                         batch_size=cfg.rollout.batch_size, seed=seed, add_special_tokens=add_special)
        return [batch.completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    return generate_fn


def evaluate_policy(cfg: Config, model, tokenizer, out_dir: Path, step: int | None) -> dict:
    from mtp_occ.eval.runner import evaluate

    e = cfg.eval
    seed = cfg.seed * 7919 + (step or 0)
    return evaluate(make_generate_fn(model, tokenizer, cfg, seed), build_benchmarks(cfg), k=e.k,
                    template=e.template, tokenizer=tokenizer, temperature=e.temperature, top_p=e.top_p,
                    max_new_tokens=e.max_new_tokens, grader=e.grader, timeout_s=e.timeout_s, out_dir=out_dir,
                    step=step, seed=cfg.seed, n_boot=e.n_boot, limit=e.limit)
