"""GPU checks (skip visibly without CUDA): vLLM vs HF rollout log-prob parity on a small model, and one
ZeRO-3 training step on the GPU. Run them all with `bash tests/gpu/run_gpu_checks.sh` (< 8 minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.n_terms=2", "data.min_operand=1", "data.max_operand=9", "data.heldout_size=64",
         "model.pretrain.steps=150", "algo.prompts_per_step=8", "algo.group_size=4", "algo.updates_per_step=2",
         "rollout.max_new_tokens=16", "eval.enabled=false", "wandb.mode=disabled", "steps=1", "device=cuda"]


@pytest.fixture(scope="module")
def base_dir():
    from mtp_occ.config import compose
    from mtp_occ.tasks.pretrain import cached_base

    cfg = compose(SMALL)
    return cached_base(cfg.model, cfg.data, cfg.seed)


def test_vllm_logprobs_match_the_trainer(base_dir):
    pytest.importorskip("vllm")
    from mtp_occ.config import ModelConfig, ModelSource
    from mtp_occ.model.load import load_pretrained, load_tokenizer
    from mtp_occ.model.mtp import aligned_masks
    from mtp_occ.rollout.vllm import VllmRollout, logprob_mismatch

    tok = load_tokenizer(str(base_dir))
    model = load_pretrained(ModelConfig(name="t", source=ModelSource.hf, name_or_path=str(base_dir))).cuda().eval()
    engine = VllmRollout.start(str(base_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=64,
                               speculative_mtp=False, seed=0)
    engine.sync_weights(model)
    prompts = [f"{a}+{b}=" for a in range(1, 5) for b in range(1, 5)]
    for temperature in (1.0, 0.7):  # processed log-probs: the engine's include the temperature, as the trainer's
        engine.sleep(), engine.wake(), engine.sync_weights(model)  # the per-step cycle
        batch, vllm_BT = engine.generate(tok, prompts, 2, temperature=temperature, top_p=1.0, top_k=0,
                                         max_new_tokens=16, max_prompt_len=16, row_keys=torch.arange(32), seed=0)
        with torch.no_grad():
            out = model(batch.input_ids_BT.cuda(), batch.attention_mask_BT.cuda(), batch.response_mask_BT.cuda(),
                        temperature=temperature, with_mtp=False)
        loss_BT = aligned_masks(batch.attention_mask_BT, batch.response_mask_BT, 1)[0]
        gap = logprob_mismatch(out.logprob_BT.cpu(), vllm_BT, loss_BT)
        print(f"T={temperature}: vLLM vs trainer mean |Δ logp| = {gap:.2e}")
        assert gap < 1e-2, temperature


def test_one_zero3_step_on_gpu(tmp_path):
    pytest.importorskip("deepspeed")
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", *SMALL, "deepspeed=zero3", "deepspeed.bf16=true",
                        f"run_root={tmp_path}", "name=z3"], cwd=REPO, capture_output=True, text=True, timeout=400,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["fault/skipped_updates"] == 0
