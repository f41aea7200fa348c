"""Evaluate a policy with the settings of a run config: the glue between `Config`, the model's
generation and `mtp_occ.eval.runner.evaluate`. Used at the end of training (and every `eval_every`
steps) and by `python -m mtp_occ.eval`.

Under data parallelism every rank takes part in generation (each its block of the prompts; required under
ZeRO-3, where a forward gathers parameters from all ranks) and rank 0 grades and writes.

Benchmark "arith" is the embedded task's held-out set (generated from the data config's seed, disjoint
from the training stream); the six math benchmarks come from local jsonl files or the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_occ.config import Config
from mtp_occ.dist import DistInfo, gather_lists
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


def make_generate_fn(model, tokenizer, cfg: Config, seed: int, d: DistInfo | None = None, backend=None):
    """`generate_fn(prompts, n)` with the eval sampling settings, through the run's rollout backend (HF
    when none is given; a vLLM backend is woken and synced first). With several ranks, each generates an
    equal contiguous block of the prompts (the last block padded with repeats, so collectives inside
    generation line up, e.g. ZeRO-3's parameter gathers) and the blocks are all-gathered: every rank gets
    the full list. Row keys are global, so the samples are those of a single process."""
    from mtp_occ.rollout import HFRollout

    e, d = cfg.eval, d or DistInfo()
    backend = backend or HFRollout(model)
    # chat-formatted prompts already carry their special tokens
    add_special = e.template == "plain" or not getattr(tokenizer, "chat_template", None)
    synced = cfg.deepspeed.enabled and cfg.deepspeed.stage == 3 and d.world > 1

    def generate_fn(prompts: list[str], n: int) -> list[list[str]]:
        per = -(-len(prompts) // d.world)
        mine = prompts[d.rank * per:(d.rank + 1) * per]
        real = len(mine)
        mine += [prompts[-1]] * (per - real)
        backend.prepare(model)
        batch = backend.generate(tokenizer, mine, n, temperature=e.temperature, top_p=e.top_p,
                                 max_new_tokens=e.max_new_tokens, max_prompt_len=cfg.rollout.max_prompt_len,
                                 batch_size=cfg.rollout.batch_size, seed=seed, add_special_tokens=add_special,
                                 row_keys=torch.arange(per * n) + d.rank * per * n, synced_gpus=synced)
        backend.release()
        backend.metrics()  # drain the engine's counters: eval generation must not count in the next step's
        return gather_lists([batch.completions[i * n:(i + 1) * n] for i in range(real)])

    return generate_fn


def evaluate_policy(cfg: Config, model, tokenizer, out_dir: Path, step: int | None, d: DistInfo | None = None,
                    backend=None) -> dict:
    """Every rank calls this under data parallelism; rank 0 gets the summary, the others {}."""
    from mtp_occ.eval.runner import evaluate

    e, d = cfg.eval, d or DistInfo()
    seed = cfg.seed * 7919 + (step or 0)
    return evaluate(make_generate_fn(model, tokenizer, cfg, seed, d, backend), build_benchmarks(cfg), k=e.k,
                    template=e.template, tokenizer=tokenizer, temperature=e.temperature, top_p=e.top_p,
                    max_new_tokens=e.max_new_tokens, grader=e.grader, timeout_s=e.timeout_s, out_dir=out_dir,
                    step=step, seed=cfg.seed, n_boot=e.n_boot, limit=e.limit, is_main=d.is_main)
