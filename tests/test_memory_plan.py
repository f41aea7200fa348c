"""The memory plan's arithmetic on a small case computed by hand, its advice, and the paper preset's fit."""

import os
import subprocess
import sys

import pytest

from mtp_occ.config import compose
from mtp_occ.memory import memory_plan
from mtp_occ.tasks.arith import build_tokenizer

SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=256",
         "model.mtp_depth=1", "deepspeed=zero2", "deepspeed.bf16=true", "algo.max_tokens_per_micro_batch=100000"]


def _lines(plan, phase):
    return {x.label: x.gb * 1e9 for x in getattr(plan, phase)}


def test_small_case_by_hand():
    assert len(build_tokenizer()) == 25  # V below
    plan = memory_plan(compose(SMALL), world=4)
    # parameters: block = attn 64·(64+2·64) + 64² = 16,384, MLP 3·64·256 = 49,152, norms 128 -> 65,664
    # LM = 25·64·2 (embedding + untied head) + 2 blocks + final norm 64 = 134,592
    # MTP = block + projection 2·64·64 + 3 norms 192 = 74,048;  Ψ = 208,640
    t = _lines(plan, "training")
    assert t["params"] == pytest.approx(2 * 208_640)  # ZeRO-2: bf16 params replicated
    assert t["grads"] == pytest.approx(2 * 208_640 / 4)  # partitioned over 4 ranks
    assert t["optimizer"] == pytest.approx(12 * 208_640 / 4)
    assert t["ZeRO buckets"] == pytest.approx(2 * 5e8)
    # per token and layer: 16·64 + 4·64 + 8·256 = 3,328 B; 100,000 tokens, no checkpointing, 2 layers
    assert t["backbone"] == pytest.approx(2 * 3_328 * 100_000)
    assert t["MTP layers (not checkpointed)"] == pytest.approx((3_328 + 22 * 64) * 100_000)
    assert t["embeddings, final norm, head inputs"] == pytest.approx((5 * 64 + 2 * 64) * 2 * 100_000)
    # 64 MB chunks hold 640,000 tokens at V = 25, so the chunk is the whole micro-batch: 100,000 × 25 × (4 + 2)
    assert t["log-prob chunk"] == pytest.approx(100_000 * 25 * 6)
    assert t["log-prob head gradient"] == pytest.approx(6 * 25 * 64)
    states = 417_280 + 104_320 + 625_920
    total = states + 1e9 + 665_600_000 + 473_600_000 + 89_600_000 + 15_000_000 + 9_600  # 2,244,957,120
    assert plan.peaks(10.0) == pytest.approx((states / 1e9, total / 1e9))
    assert plan.fits(10.0)
    # 2 GB device: limit 1.8e9; the part that does not grow with tokens is total − 12,288 B × 100,000 =
    # 1,016,157,120 B, so (1.8e9 − that) / 12,288 B = 63,789 tokens fit: 62 × 1,024 = 63,488
    assert not plan.fits(2.0)
    assert "algo.max_tokens_per_micro_batch=63488" in plan.advice(2.0)[0]


def test_checkpointing_keeps_one_input_per_layer_and_one_recomputed_layer():
    t = _lines(memory_plan(compose([*SMALL, "model.gradient_checkpointing=true"]), world=4), "training")
    assert t["backbone (checkpointed)"] == pytest.approx((2 * 2 * 64 + 3_328) * 100_000)


def test_vllm_share_counts_in_the_rollout_phase_and_the_advice_names_it():
    plan = memory_plan(compose([*SMALL, "rollout=vllm", "rollout.gpu_memory_utilization=0.95"]), world=4)
    states = (417_280 + 104_320 + 625_920) / 1e9
    assert plan.peaks(80.0)[0] == pytest.approx(states + 0.95 * 80)
    assert not plan.fits(80.0)
    assert any("rollout.gpu_memory_utilization <= 0.89" in a for a in plan.advice(80.0))


@pytest.mark.parametrize("device_gb", [80.0, 141.0])
def test_paper_preset_fits_on_128_gpus(device_gb):
    plan = memory_plan(compose(["experiment=paper_mimo7b_dapo"]), world=128)
    assert plan.tokens == 20_480 and plan.fits(device_gb)
    dense = memory_plan(compose(["experiment=paper_mimo7b_dapo", "algo.logprob_chunk_mb=0"]), world=128)
    assert not dense.fits(80.0)  # the [B,T,V] path alone would not


def test_dry_run_prints_the_plan():
    env = {**os.environ, "WORLD_SIZE": "128"}
    out = subprocess.run([sys.executable, "-m", "mtp_occ.run", "experiment=paper_mimo7b_dapo", "dry_run=true"],
                         capture_output=True, text=True, env=env, timeout=120, check=True).stdout
    assert "memory plan per rank (world 128, 20,480 tokens" in out
    assert "on 80 GB:" in out and "on 141 GB:" in out and "DOES NOT FIT" not in out
