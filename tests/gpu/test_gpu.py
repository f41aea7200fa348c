"""GPU checks: only what the CPU build of vLLM cannot settle (skip visibly without CUDA). Run them all with
`bash tests/gpu/run_gpu_checks.sh` (< 8 minutes, one line per check):
- sleep level 2 releases the engine's GPU memory and wake + sync restores log-prob parity with the trainer;
- vLLM's new model runner ("V2") is the one in use, and it reaches the MTP drafter through get_draft_model;
- one ZeRO-3 bf16 training step on the GPU (DeepSpeed's CUDA gather path)."""

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
PROMPTS = [f"{a}+{b}=" for a in range(1, 5) for b in range(1, 5)]


@pytest.fixture(scope="module")
def base_dir():
    from mtp_occ.config import compose
    from mtp_occ.tasks.pretrain import cached_base

    cfg = compose(SMALL)
    return cached_base(cfg.model, cfg.data, cfg.seed)


@pytest.fixture(scope="module")
def engine(base_dir):
    pytest.importorskip("vllm")
    from mtp_occ.rollout.vllm import VllmRollout

    e = VllmRollout.start(str(base_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=64,
                          speculative_mtp=False, seed=0, sleep_level=2)
    yield e
    e.close()


def _gap(engine, model, tok, temperature):
    from mtp_occ.model.mtp import aligned_masks
    from mtp_occ.rollout.vllm import logprob_mismatch

    batch, vllm_BT = engine.generate(tok, PROMPTS, 2, temperature=temperature, top_p=1.0, top_k=0,
                                     max_new_tokens=16, max_prompt_len=16, row_keys=torch.arange(32), seed=0)
    with torch.no_grad():
        out = model(batch.input_ids_BT.cuda(), batch.attention_mask_BT.cuda(), batch.response_mask_BT.cuda(),
                    temperature=temperature, with_mtp=False)
    loss_BT = aligned_masks(batch.attention_mask_BT, batch.response_mask_BT, 1)[0]
    return logprob_mismatch(out.logprob_BT.cpu(), vllm_BT, loss_BT)


def test_sleep_level_2_releases_memory_and_wake_sync_restores_parity(engine, base_dir):
    from mtp_occ.config import ModelConfig, ModelSource
    from mtp_occ.model.load import load_pretrained, load_tokenizer

    tok = load_tokenizer(str(base_dir))
    model = load_pretrained(ModelConfig(name="t", source=ModelSource.hf, name_or_path=str(base_dir))).cuda().eval()
    engine.sync_weights(model)
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    torch.cuda.synchronize()
    released = torch.cuda.mem_get_info()[0] - free_awake
    total = torch.cuda.mem_get_info()[1]
    print(f"sleep level 2 released {released / 2**30:.2f} GiB")
    assert released > 0.1 * total, "sleep did not release the engine's memory (KV cache + weights)"
    engine.wake()
    engine.sync_weights(model)  # level 2 discarded the weights: the sync rewrites them
    for temperature in (1.0, 0.7):
        gap = _gap(engine, model, tok, temperature)
        print(f"T={temperature}: vLLM vs trainer mean |Δ logp| = {gap:.2e}")
        assert gap < 1e-3, temperature


def test_the_new_model_runner_is_in_use_and_reaches_the_drafter_api(engine):
    from mtp_occ.rollout.vllm import on_worker

    module, has_draft = on_worker(engine.llm, lambda r: (type(r).__module__, hasattr(r, "get_draft_model")))
    print(f"model runner: {module}")
    assert ".worker.gpu." in module, f"expected vLLM's V2 runner (vllm.v1.worker.gpu.*), got {module}"
    assert has_draft


def test_one_zero3_bf16_step_on_gpu(tmp_path):
    pytest.importorskip("deepspeed")
    p = subprocess.run([sys.executable, "-m", "mtp_occ.run", *SMALL, "deepspeed=zero3", "deepspeed.bf16=true",
                        f"run_root={tmp_path}", "name=z3"], cwd=REPO, capture_output=True, text=True, timeout=400,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["fault/skipped_updates"] == 0
