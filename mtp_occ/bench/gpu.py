"""Section 5, CUDA only: HF vs vLLM generated tokens/s, MTP speculative decoding on/off, training
tokens/s and MFU. Skipped (and recorded as skipped) without CUDA; vLLM is imported lazily."""

from __future__ import annotations

from time import perf_counter

import torch

from mtp_occ.bench.common import median
from mtp_occ.bench.step import fresh, full_step, rollout

# ------------------------------------------------------------------------------------------------- 5 GPU


def bench_gpu(overrides: list[str]) -> dict:
    """HF vs vLLM tokens/s, MTP speculative decoding, training tokens/s and MFU; CUDA only."""
    if not torch.cuda.is_available():
        print("GPU section skipped: no CUDA", flush=True)
        return {"skipped": "no CUDA"}
    from mtp_occ.config import compose
    from mtp_occ.data import build_prompts
    from mtp_occ.policy import build_policy

    cfg = compose([*overrides, "regime=detach"])
    base, tok, base_dir = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)
    base = base.cuda()
    prompts = build_prompts(cfg.data, cfg.data.seed)
    out: dict = {"device": torch.cuda.get_device_name(0), "overrides": overrides}
    rollout(cfg, base, tok, prompts, 1)  # warm-up
    hf = [rollout(cfg, base, tok, prompts, 1)[2] for _ in range(3)]
    out["hf_tokens_per_s"] = median([h["tokens"] / h["generate_s"] for h in hf])
    out.update(gpu_training(cfg, overrides, base, tok, prompts))
    out["vllm"] = gpu_vllm(cfg, str(base_dir or cfg.model.name_or_path), base, tok, prompts, out["hf_tokens_per_s"])
    return out


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # bf16 dense


def gpu_training(cfg, overrides, base, tok, prompts) -> dict:
    """Training tokens/s (real prompt + response tokens through forward + backward per update second)
    and MFU ≈ 6·N·tokens/s ÷ the device's bf16 dense peak (fp32 models: read it as a rough upper bound)."""
    from mtp_occ.config import compose

    res = {}
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(0)), None)
    n_params = sum(p.numel() for p in base.parameters())
    for name in ("detach", "occ"):
        c = compose([*overrides, f"regime={name}"])
        runs = []
        for _ in range(3):
            model, opt, regime = fresh(c, base)
            torch.cuda.synchronize()
            runs.append(full_step(c, model, tok, opt, regime, prompts, 1))
            torch.cuda.synchronize()
        tps = median([r["seq_tokens"] / r["update_s"] for r in runs])
        res[f"{name}_train_tokens_per_s"] = tps
        res[f"{name}_mfu"] = 6 * n_params * tps / (peak * 1e12) if peak else None
    res["mfu_peak_tflops"] = peak
    return res


def gpu_vllm(cfg, path: str, base, tok, prompts, hf_tps: float) -> dict:
    """Generated tokens/s of the project's vLLM backend (`mtp_occ.rollout.vllm`, which imports vllm
    lazily: GPU machines only) without and with MTP speculative decoding, plus one weight sync. The
    speculative run needs a model vLLM has an MTP drafter for (MiMo-layout checkpoints); otherwise its
    error is recorded."""
    try:
        import vllm  # noqa: F401  (only to tell "not installed" apart from a failing run)

        from mtp_occ.rollout.vllm import VllmRollout
    except ImportError as e:
        return {"skipped": f"vllm not importable ({e}); pip install -e '.[gpu]'"}
    from mtp_occ.eval.templates import get_template
    from mtp_occ.rollout.sampling import SamplingSettings

    a, r, P = cfg.algo, cfg.rollout, cfg.algo.prompts_per_step
    template, sampling = get_template(cfg.data.template), SamplingSettings.for_rollouts(r)
    texts = [template.render(prompts[i].problem, tok) for i in range(P)]
    keys = torch.arange(P * a.group_size)
    res: dict = {}
    for label, spec in (("plain", False), ("mtp_spec", True)):
        engine = None
        try:
            engine = VllmRollout.start(path, dtype=cfg.model.dtype, gpu_memory_utilization=r.gpu_memory_utilization,
                                       max_model_len=r.max_prompt_len + r.max_new_tokens, speculative_mtp=spec,
                                       seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
            t0 = perf_counter()
            engine.sync_weights(base)
            sync_s = perf_counter() - t0
            runs = []
            for rep in range(4):  # the first is warm-up
                t0 = perf_counter()
                batch, _ = engine.generate(tok, texts, a.group_size, sampling, row_keys=keys, seed=cfg.seed + rep,
                                           add_special_tokens=template.add_special_tokens(tok))
                runs.append(int(batch.response_len_B.sum()) / (perf_counter() - t0))
            res[label] = {"tokens_per_s": median(runs[1:]), "over_hf": median(runs[1:]) / hf_tps, "sync_s": sync_s,
                          **engine.metrics()}
        except Exception as e:  # report, never fake a number
            res[label] = {"error": f"{type(e).__name__}: {e}"[:400]}
        finally:  # vLLM's CuMem allocator allows one engine per process: the next start needs this one shut down
            if engine is not None:
                engine.close()
            torch.cuda.empty_cache()
    return res
