"""The evaluation run: prompts -> k samples per problem -> grades -> metrics, with every sample saved.

What it is
    `evaluate(generate_fn, benchmarks, k=..., template=..., ...)` formats each problem with a prompt
    template, asks `generate_fn(prompts, n)` for k completions per prompt (ONE call for all benchmarks, so a
    vLLM engine can schedule everything at once), grades them with `mtp_occ.rewards.grade` and writes
      out_dir/summary.json    settings + per-benchmark avg@k / pass@k / maj@k with 95% bootstrap CIs
      out_dir/samples.jsonl   one line per sample: benchmark, id, sample, prompt, completion, answer,
                              extracted, score, timeout
    and, when `step` is given, a copy of the summary in out_dir/step_<step>/summary.json so periodic evals
    survive the next one (the layout is `mtp_occ.rundir.EvalDir`). Files are written atomically
    (`mtp_occ.rundir.atomic_write_text`: temp file, fsync, os.replace). `flat_metrics(summary)` flattens it
    for the logger (`eval/<bench>/avg`, ..., `eval/average/avg`, ...).

How it departs from common harnesses
    - Sampling settings (temperature, top_p, max_new_tokens) are the CALLER's to bind into `generate_fn`;
      they are passed here only to be recorded next to the numbers they produced. Pass the same values.
    - pass is pass@k with n = k (all k samples drawn), i.e. the fraction of problems with >= 1 correct
      sample; "average" is the unweighted mean over benchmarks (AIME counts as much as MATH-500).
    - Only the summary is kept per step; samples.jsonl is overwritten by each eval (k=32 x 1,547 problems
      x 8k tokens is GBs). Keep them by giving each eval its own out_dir.

How to use
    summary = evaluate(generate_fn, [load_benchmark(b) for b in BENCHMARK_NAMES], k=32,
                       template="qwen_boxed", tokenizer=tok, temperature=1.0, top_p=1.0,
                       max_new_tokens=8192, grader="math_verify", timeout_s=2.0, out_dir=run_dir / "eval")
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mtp_occ.eval.benchmarks import Benchmark
from mtp_occ.eval.metrics import average_over, summarize
from mtp_occ.eval.templates import format_prompt, get_template
from mtp_occ.rundir import EvalDir, atomic_write_text

GenerateFn = Callable[[list[str], int], list[list[str]]]
STATS = ("avg", "pass", "maj")
# the keys of one samples.jsonl record, in the order they are written
SAMPLE_FIELDS = ("benchmark", "id", "sample", "prompt", "completion", "answer", "extracted", "score", "timeout")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _generate(generate_fn: GenerateFn, prompts: list[str], k: int) -> list[list[str]]:
    completions = generate_fn(prompts, k)
    if len(completions) != len(prompts):
        raise ValueError(f"generate_fn returned {len(completions)} lists for {len(prompts)} prompts; "
                         "it must return one list of n completions per prompt")
    bad = next((i for i, c in enumerate(completions) if len(c) != k), None)
    if bad is not None:
        raise ValueError(f"generate_fn returned {len(completions[bad])} completions for prompt {bad}, "
                         f"expected n={k}")
    return completions


def _records(benchmarks: Sequence[Benchmark], prompts: list[str], completions: list[list[str]]) -> list[dict]:
    problems = [(b.name, p) for b in benchmarks for p in b.problems]
    return [{"benchmark": name, "id": p.id, "sample": j, "prompt": prompt, "completion": text,
             "answer": p.answer}
            for (name, p), prompt, samples in zip(problems, prompts, completions, strict=True)
            for j, text in enumerate(samples)]


def evaluate(generate_fn: GenerateFn, benchmarks: Sequence[Benchmark], *, k: int, template: str, tokenizer,
             temperature: float, top_p: float, max_new_tokens: int, grader: str, timeout_s: float,
             out_dir: str | os.PathLike, step: int | None = None, seed: int = 0, n_boot: int = 1000,
             limit: int | None = None, is_main: bool = True, extra: Callable[[], dict] | None = None) -> dict:
    """Sample, grade, score and save (see the module docstring); returns the summary dict.
    `limit` keeps the first N problems of each benchmark (and is recorded); `seed` seeds the bootstrap.
    With several ranks every rank calls this (generation may be collective); only `is_main` grades,
    saves and gets the summary, the others return {}. `extra()` (called on every rank after generation: it
    may be collective) adds its dict to the summary as `extra`, e.g. the MTP head's acceptance."""
    from mtp_occ.rewards import grade  # the grading pool only when an eval actually runs

    if k < 1 or not benchmarks:
        raise ValueError(f"evaluate() needs k >= 1 and at least one benchmark (got k={k}, "
                         f"{len(benchmarks)} benchmarks)")
    get_template(template)  # fail on a typo before generating anything
    benchmarks = [Benchmark(b.name, b.problems[:limit] if limit else b.problems) for b in benchmarks]
    prompts = [format_prompt(p.problem, template, tokenizer) for b in benchmarks for p in b.problems]
    completions = _generate(generate_fn, prompts, k)
    more = extra() if extra is not None else None
    if not is_main:
        return {}
    records = _records(benchmarks, prompts, completions)
    verdicts = grade([r["completion"] for r in records], [r["answer"] for r in records], grader=grader,
                     timeout_s=timeout_s)
    for record, verdict in zip(records, verdicts, strict=True):
        record.update(extracted=verdict.extracted, score=verdict.score, timeout=verdict.timeout)
    per_bench = summarize(records, n_boot=n_boot, seed=seed)
    summary = {
        "step": step,
        "settings": {"template": template, "temperature": float(temperature), "top_p": float(top_p),
                     "max_new_tokens": int(max_new_tokens), "k": int(k), "grader": grader,
                     "timeout_s": float(timeout_s), "seed": int(seed), "limit": limit},
        "benchmarks": per_bench,
        "average": average_over(per_bench),
        **({"extra": more} if more else {}),
    }
    out = EvalDir(out_dir)
    out.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.samples, (json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if step is not None:
        _write_json(out.step_summary(step), summary)
    _write_json(out.summary, summary)
    return summary


def flat_metrics(summary: dict) -> dict[str, float]:
    """`eval/<bench>/{avg,pass,maj}` and `eval/average/{avg,pass,maj}` as floats, for metric loggers."""
    out = {f"eval/{name}/{s}": float(stats[s])
           for name, stats in summary["benchmarks"].items() for s in STATS}
    out.update({f"eval/average/{s}": float(summary["average"][s]) for s in STATS})
    out.update({f"eval/{k}": float(v) for k, v in summary.get("extra", {}).items()})
    return out
