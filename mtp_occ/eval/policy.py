"""Evaluate a policy with the settings of a run config: `evaluate_policy` is the one place that reads the
root `Config` and hands each piece its section (`build_benchmarks`: eval + data, `make_generate_fn`: eval +
rollout settings) on to `mtp_occ.eval.runner.evaluate` (flat arguments). Used at the end of training (and every `eval_every`
steps) and by `python -m mtp_occ.eval`.

Under data parallelism every rank takes part in generation (each its block of the prompts; required under
ZeRO-3, where a forward gathers parameters from all ranks) and rank 0 grades and writes.

A benchmark named after a task (`mtp_occ.tasks`, e.g. "arith") is that task's held-out set (generated from
the data config, disjoint from the training stream); the six math benchmarks come from local jsonl files
or the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_occ.config import Config, DataConfig, EvalConfig, RolloutConfig
from mtp_occ.dist import DistInfo, gather_lists, sum_floats
from mtp_occ.eval.benchmarks import Benchmark, Problem, load_benchmark


def build_benchmarks(e: EvalConfig, data: DataConfig) -> list[Benchmark]:
    """`e.benchmarks` in order: a task's held-out set (for `data`) or a math benchmark's file."""
    from mtp_occ.tasks import TASKS

    out = []
    for name in e.benchmarks:
        if name in TASKS:
            probs = [Problem(p.id, p.problem, p.answer, name) for p in TASKS[name].heldout(data)]
            out.append(Benchmark(name, probs[: e.limit] if e.limit else probs))
        else:
            out.append(load_benchmark(name, e.data_dir or None, hub=e.hub, limit=e.limit))
    return out


def make_generate_fn(model, tokenizer, e: EvalConfig, rollout: RolloutConfig, seed: int, d: DistInfo | None = None,
                     backend=None, synced_gpus: bool = False):
    """`generate_fn(prompts, n)` with the eval sampling settings, through the run's rollout backend (HF
    when none is given; a vLLM backend is woken and synced first). With several ranks, each generates an
    equal contiguous block of the prompts (the last block padded with repeats, so collectives inside
    generation line up, e.g. ZeRO-3's parameter gathers) and the blocks are all-gathered: every rank gets
    the full list. Row keys are global, so the samples are those of a single process. `rollout` gives the
    prompt length and batching; `synced_gpus`: ZeRO-3 with several ranks."""
    from mtp_occ.eval.templates import get_template
    from mtp_occ.rollout import HFRollout
    from mtp_occ.rollout.sampling import SamplingSettings

    d = d or DistInfo()
    backend = backend or HFRollout(model)
    add_special = get_template(e.template).add_special_tokens(tokenizer)  # the rule training uses too
    sampling = SamplingSettings.for_eval(e, rollout)

    hits_total = [0.0, 0.0]

    def generate_fn(prompts: list[str], n: int) -> list[list[str]]:
        per = -(-len(prompts) // d.world)
        mine = prompts[d.rank * per:(d.rank + 1) * per]
        real = len(mine)
        mine += [prompts[-1]] * (per - real)
        backend.prepare(model)
        batch = backend.generate(tokenizer, mine, n, sampling, seed=seed, add_special_tokens=add_special,
                                 row_keys=torch.arange(per * n) + d.rank * per * n, synced_gpus=synced_gpus)
        backend.release()
        if e.mtp_accept:
            hits, total = mtp_hits(model, batch, real * n, rollout.batch_size or len(batch))
            hits_total[0], hits_total[1] = hits_total[0] + hits, hits_total[1] + total
        backend.metrics()  # drain the engine's counters: eval generation must not count in the next step's
        return gather_lists([batch.completions[i * n:(i + 1) * n] for i in range(real)])

    def acceptance() -> dict[str, float]:
        """`mtp_accept` over every rank's samples (collective: every rank calls it)."""
        hits, total = sum_floats(hits_total)
        return {"mtp_accept": hits / total} if e.mtp_accept and total > 0 else {}

    generate_fn.acceptance = acceptance
    return generate_fn


@torch.no_grad()
def mtp_hits(model, batch, n_real: int, rows_per_forward: int) -> tuple[float, float]:
    """(hits, response targets) of depth 1 over the first `n_real` rows of `batch`: its argmax equals the
    sampled token. Every row is run (a rank's padding repeats included), so ranks stay in step under ZeRO-3."""
    if model.depth == 0:
        return 0.0, 0.0
    was = model.training
    model.eval()
    hits = total = 0.0
    for s in range(0, len(batch), rows_per_forward):
        rows = torch.arange(s, min(s + rows_per_forward, len(batch)))
        part = batch.select(rows)
        out = model(part.input_ids_BT, part.attention_mask_BT, part.response_mask_BT)
        keep_B = (rows < n_real).to(out.mtp_ce_mask_KBT.device)
        mask_BT = out.mtp_ce_mask_KBT[0] & keep_B[:, None]
        hits += float((out.mtp_hit_KBT[0] & mask_BT).sum())
        total += float(mask_BT.sum())
    model.train(was)
    return hits, total


def evaluate_policy(cfg: Config, model, tokenizer, out_dir: Path, step: int | None, d: DistInfo | None = None,
                    backend=None) -> dict:
    """Every rank calls this under data parallelism; rank 0 gets the summary, the others {}."""
    from mtp_occ.eval.runner import evaluate

    e, d = cfg.eval, d or DistInfo()
    seed = cfg.seed * 7919 + (step or 0)
    synced = cfg.deepspeed.enabled and cfg.deepspeed.stage == 3 and d.world > 1
    generate_fn = make_generate_fn(model, tokenizer, e, cfg.rollout, seed, d, backend, synced_gpus=synced)
    return evaluate(generate_fn, build_benchmarks(e, cfg.data), k=e.k, extra=generate_fn.acceptance,
                    template=e.template, tokenizer=tokenizer, temperature=e.temperature, top_p=e.top_p,
                    max_new_tokens=e.max_new_tokens, grader=e.grader, timeout_s=e.timeout_s, out_dir=out_dir,
                    step=step, seed=cfg.seed, n_boot=e.n_boot, limit=e.limit, is_main=d.is_main)
