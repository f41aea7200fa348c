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
6. Memory (`mtp_occ.bench.memory`): peak memory and time of the loss's log-prob computation at MiMo's
   vocabulary, dense vs chunked (`logprob_mem_ratio_*`, `logprob_max_err`), and the update time of a batch
   with a realistic length spread, padded vs token-budget vs packed micro-batches.
7. `vllm_cpu_over_hf` (`mtp_occ.bench.rollout_vllm`): rollout tokens/s of vLLM's CPU build against HF
   `generate` on the same model, prompts, group size and lengths (recorded as skipped without vLLM).

How it departs from the paper's measurement (DESIGN §1.3: OCC 8.07 s/step, Detach 8.11 s, exact gradient
inner products 45.06 s on MiMo-7B with verl): a 2-layer d=64 model on CPU, where per-op overhead and
attention dominate and rollouts are short, instead of a 7B model on GPUs where generation dominates the
step; so the update-phase ratios are the stricter test (a whole step dilutes them with rollout time).
Our diagnostics reuse the step's graph (one extra backward), while the paper ran separate backward passes.
No timed assertion exists anywhere: the numbers are reported, never checked.
"""

from mtp_occ.bench.cli import FULL, QUICK, main, parse_args, run_trl
from mtp_occ.bench.common import HOSTILE, MIN_REPS, REGIMES, REPO, VARIANTS, median
from mtp_occ.bench.gpu import PEAK_TFLOPS, bench_gpu, gpu_training, gpu_vllm
from mtp_occ.bench.grading import bench_rewards, reward_items
from mtp_occ.bench.peer import bench_trl, trl_config, trl_reward
from mtp_occ.bench.regimes import bench_regimes, ratio_spread, rotated, round_ratios
from mtp_occ.bench.report import EXPLAIN, assemble, fmt, machine_info, print_table, table_rows, write_markdown
from mtp_occ.bench.step import fresh, full_step, rollout, update

__all__ = [
    "EXPLAIN", "FULL", "HOSTILE", "MIN_REPS", "PEAK_TFLOPS", "QUICK", "REGIMES", "REPO", "VARIANTS", "assemble",
    "bench_gpu", "bench_regimes", "bench_rewards", "bench_trl", "fmt", "fresh", "full_step", "gpu_training",
    "gpu_vllm", "machine_info", "main", "median", "parse_args", "print_table", "ratio_spread", "reward_items",
    "rollout", "rotated", "round_ratios", "run_trl", "table_rows", "trl_config", "trl_reward", "update",
    "write_markdown",
]
