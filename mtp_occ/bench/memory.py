"""Section 6: memory and throughput of the update (issue: paper-scale memory).

1. `logprob_mem_ratio_{1k,4k}`: peak memory of the loss's log-prob computation, the dense [B,T,V] reference
   (`algo.logprob_chunk_mb=0`, what the model computed before) ÷ the chunked response-only path at the
   default chunk (`mtp_occ.model.logprob`), for a tiny model's head width (d=64) with MiMo's vocabulary
   (151,680), one sequence of T tokens (the first T/8 a prompt), the main head and one MTP depth sharing
   the head: forward, a weighted sum of the log-probs, backward. Each variant runs in its own process
   (`python -m mtp_occ.bench.memory --probe ...`); the peak is the process's resident high-water mark
   above its level just before the computation (Linux `clear_refs`; glibc told to mmap every allocation
   over 64 KB, so a freed tensor leaves the resident set at once), or `torch.cuda.max_memory_allocated`
   on a GPU. `logprob_max_err` / `logprob_grad_max_err`: the largest difference of the log-probs and of
   the gradients (hidden states and head weight, relative to the largest gradient) between the two.
   `logprob_time_ratio_*`: chunked ÷ dense seconds (the chunked path recomputes the logits in backward).
2. `spread_{budget,packed}_over_padded`: one update (`rl_update`, regime ce, 16 sequences with prompts of
   16–64 and responses of 50–2,000 tokens) with token-budget micro-batches, and with them packed, ÷ the
   same update in fixed micro-batches of 4 rows at full width; interleaved rounds, median of within-round
   ratios. `spread_max_err`: largest relative difference of the gradient norm and losses between them.
   On CPU, packing builds a dense block-diagonal mask, so its attention does not get cheaper (flash-
   attention's varlen path on a GPU does); see `mtp_occ.model.packing`.
3. `default_update_ratio`: the embedded default's update (its tiny model and batch shape) with the
   chunked log-probs ÷ with the dense reference, interleaved rounds, median ratio: the no-slowdown check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter

import torch

from mtp_occ.bench.common import REPO, median

MIMO_VOCAB, WIDTH = 151_680, 64

EXPLAIN_MEMORY = {
    "logprob_mem_ratio_1k": "peak memory of the loss's log-probs (main + MTP head, V=151,680, d=64, T=1,024), "
                            "dense [B,T,V] ÷ chunked (goal >= 8)",
    "logprob_mem_ratio_4k": "the same at T=4,096",
    "logprob_time_ratio_4k": "seconds of that computation at T=4,096, chunked ÷ dense",
    "logprob_max_err": "largest log-prob difference, chunked vs dense (both T)",
    "logprob_grad_max_err": "largest gradient difference (hidden states, head weight) ÷ largest gradient",
    "spread_budget_over_padded": "update of 16 sequences (responses 50–2,000 tokens): token-budget micro-batches "
                                 "÷ fixed 4-row padded micro-batches",
    "spread_packed_over_padded": "the same, token-budget micro-batches packed (CPU: dense block-diagonal mask)",
    "spread_max_err": "largest relative difference of grad norm / losses between the three",
    "default_update_ratio": "embedded default's update, chunked log-probs ÷ dense reference (no-slowdown check)",
}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(mode: str, T: int, reps: int, out: Path) -> dict:
    """One variant's peak bytes and seconds (run in a fresh process; see the module docstring)."""
    from mtp_occ.model.logprob import DENSE, head_logprob_BT

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(1, T, WIDTH, generator=g).to(dev).requires_grad_()
    h1 = torch.randn(1, T, WIDTH, generator=g).to(dev).requires_grad_()
    w = (torch.randn(MIMO_VOCAB, WIDTH, generator=g) * 0.02).to(dev).requires_grad_()
    ids = torch.randint(0, MIMO_VOCAB, (1, T), generator=g).to(dev)
    coef = torch.randn(1, T, generator=g).to(dev)
    mask = torch.zeros(1, T, dtype=torch.bool, device=dev)
    mask[:, T // 8 - 1:T - 1] = True  # response targets
    chunk = DENSE if mode == "old" else 64.0

    def run():
        for t in (h0, h1, w):
            t.grad = None
        lp = head_logprob_BT(h0, w, None, ids, mask, 1.0, chunk)
        lp_mtp = head_logprob_BT(h1, w, None, ids, mask & (torch.arange(T, device=dev) >= 1), 1.0, chunk, shift=1)
        ((lp + 0.5 * lp_mtp) * coef).sum().backward()
        return lp.detach(), lp_mtp.detach()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark to the current size
        base = _rss_kb("VmRSS") * 1024
    lp, lp_mtp = run()
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_kb("VmHWM") * 1024) - base
    secs = []
    for _ in range(reps):
        t0 = perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        secs.append(perf_counter() - t0)
    torch.save({"lp": lp.cpu(), "lp_mtp": lp_mtp.cpu(), "grads": [t.grad.cpu() for t in (h0, h1, w)]}, out)
    return {"peak_bytes": peak, "seconds": secs, "device": str(dev)}


def _probe_subprocess(mode: str, T: int, reps: int, tmp: Path) -> dict:
    out = tmp / f"{mode}_{T}.pt"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "mtp_occ.bench.memory", "--probe", mode, "--tokens", str(T),
                          "--reps", str(reps), "--out", str(out)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"probe {mode} T={T} failed: {res.stderr[-800:]}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "file": out}


def bench_logprob(tokens: list[int], reps: int) -> dict:
    """Old vs new log-prob peaks, times and errors at each T (section 1)."""
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="mtp_occ_bench_lp_") as d:
        errs, gerrs = [], []
        for T in tokens:
            old, new = (_probe_subprocess(m, T, reps, Path(d)) for m in ("old", "new"))
            a, b = torch.load(old.pop("file")), torch.load(new.pop("file"))
            errs.append(max(float((a[k] - b[k]).abs().max()) for k in ("lp", "lp_mtp")))
            gerrs.append(max(float((x - y).abs().max() / x.abs().max()) for x, y in zip(a["grads"], b["grads"], strict=True)))
            res[f"T{T}"] = {"old": old, "new": new, "mem_ratio": old["peak_bytes"] / new["peak_bytes"],
                            "time_ratio": median(new["seconds"]) / median(old["seconds"])}
        res["max_err"], res["grad_max_err"] = max(errs), max(gerrs)
    return res


def spread_batch(rows: int, prompt: tuple[int, int], response: tuple[int, int], vocab: int, seed: int = 0):
    """Left-padded prompts and right-padded responses with lengths drawn uniformly from the ranges."""
    from mtp_occ.rollout.hf import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    p_B = torch.randint(prompt[0], prompt[1] + 1, (rows,), generator=g)
    r_B = torch.randint(response[0], response[1] + 1, (rows,), generator=g)
    P, R = int(p_B.max()), int(r_B.max())
    ids = torch.zeros(rows, P + R, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(p_B.tolist(), r_B.tolist(), strict=True)):
        ids[b, P - p:P + r] = torch.randint(3, vocab, (p + r,), generator=g)
        attn[b, P - p:P + r], resp[b, P:P + r] = 1, 1
    return RolloutBatch(ids, attn, resp, r_B, torch.zeros(rows, dtype=torch.bool), torch.arange(rows) // 2,
                        [""] * rows, 0), torch.randn(rows, generator=g)


def _timed_updates(variants: dict, base_overrides: list[str], batch, adv_B, rounds: int) -> dict:
    """Interleaved rounds of one `rl_update` per variant from fresh copies of one model; times and metrics."""
    import copy

    from mtp_occ.config import compose
    from mtp_occ.engine import TorchEngine
    from mtp_occ.model.load import build_tiny
    from mtp_occ.regimes import build_regime
    from mtp_occ.tasks.arith import build_tokenizer
    from mtp_occ.update import old_logprobs, rl_update

    cfgs = {k: compose([*base_overrides, *v]) for k, v in variants.items()}
    c0, tok = next(iter(cfgs.values())), build_tokenizer()
    base = build_tiny(c0.model, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed=0)
    group_size = c0.algo.group_size
    times, metrics = {k: [] for k in cfgs}, {}
    for rnd in range(-1, rounds):  # round -1 is warm-up
        names = list(cfgs)[rnd % len(cfgs):] + list(cfgs)[:rnd % len(cfgs)]
        for name in names:
            cfg, model = cfgs[name], copy.deepcopy(base)
            old = old_logprobs(model, batch, cfg.algo, cfg.rollout.temperature)
            t0 = perf_counter()
            engine = TorchEngine(model, cfg.algo, total_steps=cfg.steps)
            res = rl_update(model, engine, build_regime(cfg.regime), batch, old, adv_B, cfg.algo,
                            coef_scale=1.0, temperature=cfg.rollout.temperature, group_size=group_size)
            if rnd >= 0:
                times[name].append(perf_counter() - t0)
            metrics[name] = res.metrics
    return {"seconds": times, "metrics": metrics}


def _ratio(times: dict, num: str, den: str) -> float:
    return median([a / b for a, b in zip(times[num], times[den], strict=True)])


def bench_spread(rows: int, response: tuple[int, int], rounds: int) -> dict:
    """Padded vs token-budget vs packed update on a batch with realistic length spread (section 2)."""
    from mtp_occ.tasks.arith import build_tokenizer

    budget = 4 * (64 + response[1])  # as many tokens as the padded micro-batch of 4 rows at full width
    batch, adv = spread_batch(rows, (16, 64), response, len(build_tokenizer()), seed=0)
    base = ["regime=ce", f"algo.prompts_per_step={rows // 2}", "algo.group_size=2", "algo.updates_per_step=1",
            "model.max_position=4096", "wandb.mode=disabled"]
    variants = {"padded": ["algo.micro_batch_size=4"], "budget": [f"algo.max_tokens_per_micro_batch={budget}"],
                "packed": [f"algo.max_tokens_per_micro_batch={budget}", "algo.pack_sequences=true"]}
    r = _timed_updates(variants, base, batch, adv, rounds)
    keys = ("grad/norm", "loss/pg", "loss/mtp")
    ref = r["metrics"]["padded"]
    err = max(abs(r["metrics"][v][k] - ref[k]) / max(abs(ref[k]), 1e-12) for v in ("budget", "packed") for k in keys)
    return {**r, "budget_tokens": budget, "real_tokens": int(batch.attention_mask_BT.sum()),
            "padded_tokens": batch.attention_mask_BT.numel(), "budget_over_padded": _ratio(r["seconds"], "budget", "padded"),
            "packed_over_padded": _ratio(r["seconds"], "packed", "padded"), "max_err": err}


def bench_default(rounds: int) -> dict:
    """The embedded default's update shape (tiny model, 512 rollouts, 4 updates), chunked ÷ dense (section 3)."""
    from mtp_occ.config import compose
    from mtp_occ.tasks.arith import build_tokenizer

    c = compose([])
    a, r = c.algo, c.rollout
    batch, adv = spread_batch(a.prompts_per_step * a.group_size, (12, r.max_prompt_len), (4, r.max_new_tokens),
                              len(build_tokenizer()), seed=1)
    res = _timed_updates({"dense": ["algo.logprob_chunk_mb=0"], "chunked": []}, ["wandb.mode=disabled"], batch, adv,
                         rounds)
    return {**res, "ratio": _ratio(res["seconds"], "chunked", "dense")}


def bench_memory(quick: bool) -> dict:
    """Every figure of this section; the flat keys are in `EXPLAIN_MEMORY`."""
    lp = bench_logprob([256] if quick else [1024, 4096], 1 if quick else 2)
    spread = bench_spread(8 if quick else 16, (20, 200) if quick else (50, 2000), 1 if quick else 3)
    default = bench_default(1 if quick else 5)
    Ts = [k for k in lp if k.startswith("T")]
    flat = {f"logprob_mem_ratio_{T[1:] if quick else str(int(T[1:]) // 1024) + 'k'}": lp[T]["mem_ratio"] for T in Ts}
    flat.update({"logprob_time_ratio_4k" if not quick else "logprob_time_ratio_256": lp[Ts[-1]]["time_ratio"],
                 "logprob_max_err": lp["max_err"], "logprob_grad_max_err": lp["grad_max_err"],
                 "spread_budget_over_padded": spread["budget_over_padded"],
                 "spread_packed_over_padded": spread["packed_over_padded"], "spread_max_err": spread["max_err"],
                 "default_update_ratio": default["ratio"]})
    return {"flat": flat, "details": {"logprob": lp, "spread": {k: v for k, v in spread.items() if k != "metrics"},
                                      "default": {k: v for k, v in default.items() if k != "metrics"}}}


if __name__ == "__main__":  # the probe: one variant in a fresh process
    p = argparse.ArgumentParser()
    p.add_argument("--probe", choices=("old", "new"), required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(probe(a.probe, a.tokens, a.reps, a.out)))
