"""MTP model: alignment against a brute-force reference, gradient paths, loading and saving."""

import json

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from mtp_occ.config import ConcatOrder, GradPathConfig, ModelConfig, ModelSource
from mtp_occ.model.load import build_tiny, load_pretrained, ours_to_mimo_key, save_model

V = 23


def tiny(depth=1, order="hidden_first", seed=0):
    return build_tiny(ModelConfig(name="tiny", mtp_depth=depth, concat_order=ConcatOrder(order), hidden_size=32,
                                  num_heads=4, intermediate_size=64), vocab_size=V, pad_id=0, bos_id=1, eos_id=2,
                      seed=seed).eval()


def reference_mtp(model, ids_L):
    """Unpadded, one sequence, written out loop by loop: {(k, target index j): log p_k(x_j)}."""
    lm = model.lm
    x = ids_L[None]
    h = lm.model(x).last_hidden_state
    out, L = {}, ids_L.shape[0]
    for k, layer in enumerate(model.mtp, start=1):
        n = L - k  # positions s = 0..L-k-1 have an input token x_{s+k}
        e = lm.model.embed_tokens(x[:, k:])
        pos = torch.arange(n)[None]
        mask = create_causal_mask(config=lm.config, inputs_embeds=e, attention_mask=torch.ones(1, n, dtype=torch.long),
                                  past_key_values=None, position_ids=pos)
        h = layer(h[:, :n], e, mask, pos, lm.model.rotary_emb(e, position_ids=pos))
        lp = torch.log_softmax(lm.lm_head(h).float(), -1)[0]
        for s in range(n - 1):  # position s predicts x_{s+k+1}
            out[(k, s + k + 1)] = lp[s, ids_L[s + k + 1]].item()
    return out


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("order", ["hidden_first", "embedding_first"])
def test_alignment_matches_brute_force_with_left_and_right_padding(depth, order):
    torch.manual_seed(1)
    model = tiny(depth, order)
    # row 0: left-padded prompt (2 pads), row 1: right-padded response (3 pads), row 2: no padding
    prompt_len, T = 4, 12
    ids = torch.randint(3, V, (3, T))
    attn = torch.ones(3, T, dtype=torch.long)
    attn[0, :2] = 0
    attn[1, -3:] = 0
    resp = torch.zeros(3, T, dtype=torch.long)
    resp[0, 2 + prompt_len:] = 1
    resp[1, prompt_len:T - 3] = 1
    resp[2, prompt_len:] = 1
    ids = ids.masked_fill(attn == 0, 0)
    with torch.no_grad():
        out = model(ids, attn, resp)
    for b in range(3):
        real = attn[b].nonzero().squeeze(1)
        start = int(real[0])
        ref = reference_mtp(model, ids[b, real])
        first_resp = int(resp[b].nonzero()[0])
        for k in range(1, depth + 1):
            for t in range(T):
                j = t + 1 - start  # aligned index t scores x_{t+1}; its unpadded index
                is_resp_target = t + 1 < T and bool(resp[b, t + 1])
                ce_ok = bool(out.mtp_ce_mask_KBT[k - 1, b, t])
                rl_ok = bool(out.mtp_rl_mask_KBT[k - 1, b, t])
                # ce mask: target is a response token and depth k has a prediction for it
                assert ce_ok == (is_resp_target and (k, j) in ref), (b, k, t)
                # rl mask: additionally the first k response targets are masked
                assert rl_ok == (ce_ok and t + 1 >= first_resp + k), (b, k, t)
                if ce_ok:
                    assert out.mtp_logprob_KBT[k - 1, b, t].item() == pytest.approx(ref[(k, j)], abs=1e-4)
                else:
                    assert out.mtp_logprob_KBT[k - 1, b, t].item() == 0.0
        # main head: index t scores x_{t+1}
        full = torch.log_softmax(model.lm(ids[b, real][None]).logits.float(), -1)[0]
        for t in range(T - 1):
            if out.loss_mask_BT[b, t]:
                assert out.logprob_BT[b, t].item() == pytest.approx(full[t - start, ids[b, t + 1]].item(), abs=1e-4)
    # the CE returned per depth is the masked mean of -logprob over the CE mask
    m = out.mtp_ce_mask_KBT.float()
    assert torch.allclose(out.mtp_ce_K, -(out.mtp_logprob_KBT * m).sum((1, 2)) / m.sum((1, 2)))


def _grads_of_mtp_loss(model, path: GradPathConfig):
    torch.manual_seed(0)
    ids = torch.randint(3, V, (2, 10))
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, 4:] = 1
    model.zero_grad(set_to_none=True)
    out = model(ids, attn, resp, grad_path=path)
    (out.mtp_ce_K.sum() + out.mtp_logprob_KBT.sum()).backward()
    groups = model.shared_parameters()
    nonzero = {g: any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps) for g, ps in groups.items()}
    mtp_moves = all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtp.parameters())
    return nonzero, mtp_moves


@pytest.mark.parametrize("embedding", [False, True])
@pytest.mark.parametrize("backbone", [False, True])
@pytest.mark.parametrize("lm_head", [False, True])
def test_gradient_paths(embedding, backbone, lm_head):
    model = tiny(depth=2)
    nonzero, mtp_moves = _grads_of_mtp_loss(model, GradPathConfig(embedding, backbone, lm_head))
    assert mtp_moves, "the MTP layers always train"
    assert nonzero["lm_head"] == lm_head
    assert nonzero["backbone"] == backbone
    # the embedding table is reached directly (embedding) or through the backbone's input (backbone)
    assert nonzero["embedding"] == (embedding or backbone)


def test_detach_leaves_every_shared_gradient_exactly_zero():
    model = tiny(depth=1)
    _grads_of_mtp_loss(model, GradPathConfig(False, False, False))
    for group, params in model.shared_parameters().items():
        for p in params:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, group


def _write_mimo_checkpoint(tmp_path):
    """A tiny MiMo-shaped checkpoint: Qwen2 backbone keys + model.mtp_layers.0.* in one shard."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mtp_occ.config import MtpInit
    from mtp_occ.model.load import attach_mtp

    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(3)
    src = attach_mtp(Qwen2ForCausalLM(cfg), 1, ConcatOrder.hidden_first, MtpInit.random)
    state = dict(src.lm.state_dict())
    for k, v in src.mtp.state_dict().items():
        state[ours_to_mimo_key(k)] = v
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    raw = cfg.to_dict()
    raw.update(model_type="mimo", architectures=["MiMoForCausalLM"], num_nextn_predict_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return src, state


def test_mimo_checkpoint_keys_load_into_our_layers(tmp_path):
    src, state = _write_mimo_checkpoint(tmp_path)
    assert any(k.startswith("model.mtp_layers.0.token_layernorm") for k in state)
    assert any(k.startswith("model.mtp_layers.0.self_attn.q_proj") for k in state)
    model = load_pretrained(ModelConfig(name="mimo_tiny", source=ModelSource.mimo, name_or_path=str(tmp_path),
                                        attn_implementation="sdpa"))
    for k, v in src.mtp.state_dict().items():
        assert torch.equal(model.mtp.state_dict()[k], v), k
    for k, v in src.lm.state_dict().items():
        assert torch.equal(model.lm.state_dict()[k], v), k


def test_save_then_load_roundtrip_keeps_mtp_and_outputs(tmp_path):
    model = tiny(depth=2)
    save_model(model, tmp_path)
    back = load_pretrained(ModelConfig(name="t", source=ModelSource.hf, name_or_path=str(tmp_path))).eval()
    assert back.depth == 2
    ids = torch.randint(3, V, (2, 8))
    attn, resp = torch.ones_like(ids), torch.ones_like(ids)
    with torch.no_grad():
        a, b = model(ids, attn, resp), back(ids, attn, resp)
    assert torch.allclose(a.logprob_BT, b.logprob_BT, atol=1e-5)
    assert torch.allclose(a.mtp_logprob_KBT, b.mtp_logprob_KBT, atol=1e-5)


def test_fresh_mtp_layer_on_a_model_without_one_copies_the_last_block():
    model = tiny(depth=1)
    last = model.lm.model.layers[-1]
    for name, p in last.state_dict().items():
        assert torch.equal(model.mtp[0].block.state_dict()[name], p)
