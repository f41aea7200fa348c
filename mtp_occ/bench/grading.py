"""Section 4: grading speed (serial math-verify vs 1- and 2-worker `GradingPool`s) and how fast the pool
recovers from a hostile item."""

from __future__ import annotations

from time import perf_counter

from mtp_occ.bench.common import HOSTILE, median

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
        pids = pool2.worker_pids()  # was a worker killed and replaced?
        t0 = perf_counter()
        hostile = pool2.grade([HOSTILE], ["1"], "math_verify", "boxed", hostile_timeout_s)[0]
        t1 = perf_counter()
        replaced = pids != pool2.worker_pids()
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
