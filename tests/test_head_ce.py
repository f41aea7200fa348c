"""`regime.head_ce`: a token CE that trains only the MTP layers (the drafter), whatever the regime; and
`mtp/accept`, depth 1's argmax hit rate on response targets (a CPU proxy of speculative acceptance)."""

import pytest
import torch
from test_microbatch import RecordingEngine, _batch, _model

from mtp_occ.config import compose
from mtp_occ.regimes import build_regime
from mtp_occ.update import old_logprobs, rl_update


def _update(regime, *extra, updates=2):
    cfg = compose([f"regime={regime}", "algo.prompts_per_step=4", "algo.group_size=2",
                   f"algo.updates_per_step={updates}", "algo.lr=1e-9", *extra])
    model = _model()
    batch, adv = _batch()
    old = old_logprobs(model, batch, cfg.algo, 1.0)
    old = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))  # λ ≠ 0 under occ
    engine = RecordingEngine(model, cfg.algo, total_steps=cfg.steps)
    res = rl_update(model, engine, build_regime(cfg.regime), batch, old, adv, cfg.algo, coef_scale=1.0,
                    temperature=1.0, group_size=2, head_ce=cfg.regime.head_ce)
    return model, batch, res.metrics, engine.grads


@pytest.mark.parametrize("regime", ["occ", "policy", "ce", "detach_compat"])
def test_head_ce_trains_the_mtp_layers_and_nothing_shared(regime):
    _, _, m0, g0 = _update(regime)
    _, _, m1, g1 = _update(regime, "regime.head_ce=0.5")
    assert m1["loss/head_ce"] > 0 and "loss/head_ce" not in m0
    for u in range(2):
        shared = [n for n in g0[u] if not n.startswith("mtp.")]
        if u == 0:  # the same weights: not one bit of a shared gradient changes
            assert shared and all(torch.equal(g1[u][n], g0[u][n]) for n in shared), regime
        else:  # the MTP layers moved differently at update 0, so the MTP term's shared gradient, at round-off
            assert all(torch.allclose(g1[u][n], g0[u][n], atol=1e-7, rtol=1e-5) for n in shared), regime
        mtp = [n for n in g1[u] if n.startswith("mtp.")]
        assert any((g1[u][n] - g0[u][n]).abs().max() > 1e-6 for n in mtp), regime
    for k in ("loss/pg", "loss/mtp", "mtp/lambda"):
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-9), k


def test_under_detach_head_ce_adds_to_the_ce_weight():
    """detach's MTP pass already has every input detached: head_ce reuses it, so λ=0.1 plus head_ce=0.5
    is CE with weight 0.6 on the MTP layers (the shared weights get nothing either way)."""
    _, _, m1, g1 = _update("detach", "regime.head_ce=0.5")
    _, _, m6, g6 = _update("detach", "regime.lam=0.6")
    assert m1["loss/head_ce"] + m1["loss/mtp"] == pytest.approx(m6["loss/mtp"], rel=1e-6)
    for u in range(2):
        for n in g6[u]:
            assert torch.allclose(g1[u][n], g6[u][n], atol=1e-7, rtol=1e-5), n


def test_accept_is_depth_1s_argmax_hit_rate_on_response_targets():
    model, batch, m, _ = _update("policy", updates=1)
    with torch.no_grad():  # one update: its forward saw exactly these weights
        out = model(batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT, logprob_chunk_mb=0)
        head = model.lm.get_output_embeddings().weight
    mask = out.mtp_ce_mask_KBT[0]
    assert torch.equal(out.mtp_hit_KBT[0] & ~mask, torch.zeros_like(mask))
    assert m["mtp/accept"] == pytest.approx(float(out.mtp_hit_KBT[0].sum()) / float(mask.sum()), rel=1e-9)
    assert 0.0 <= m["mtp/accept"] <= 1.0 and head.shape[0] > 2


def test_packed_micro_batches_give_the_same_head_terms():
    budget = ["algo.max_tokens_per_micro_batch=24", "rollout.max_prompt_len=8", "rollout.max_new_tokens=16"]
    _, _, ref, _ = _update("policy", "regime.head_ce=0.5")
    _, _, packed, _ = _update("policy", "regime.head_ce=0.5", *budget, "algo.pack_sequences=true")
    for k in ("loss/head_ce", "mtp/accept", "mtp/ce"):
        assert packed[k] == pytest.approx(ref[k], rel=1e-5), k


def test_eval_acceptance_counts_only_real_rows_and_reaches_the_summary(tmp_path):
    from mtp_occ.eval.policy import evaluate_policy, mtp_hits
    from mtp_occ.eval.runner import flat_metrics
    from mtp_occ.policy import build_policy

    model, (batch, _) = _model(), _batch()
    hits, total = mtp_hits(model, batch, 5, 3)  # rows 5..7 stand in for a rank's padding repeats
    ref_hits, ref_total = mtp_hits(model, batch.select(torch.arange(5)), 5, 8)
    assert (hits, total) == (ref_hits, ref_total) and total > 0
    cfg = compose(["model.pretrain.steps=0", "eval.limit=4", "eval.k=2", "eval.max_new_tokens=6", "eval.n_boot=10",
                   "regime=detach"])
    model, tok, _ = build_policy(cfg.model, cfg.data, 0)
    summary = evaluate_policy(cfg, model, tok, tmp_path / "eval", step=1)
    assert 0.0 <= summary["extra"]["mtp_accept"] <= 1.0
    assert flat_metrics(summary)["eval/mtp_accept"] == summary["extra"]["mtp_accept"]
    off = evaluate_policy(compose([*["model.pretrain.steps=0", "eval.limit=4", "eval.k=2", "eval.max_new_tokens=6",
                                     "eval.n_boot=10", "regime=detach"], "eval.mtp_accept=false"]),
                          model, tok, tmp_path / "off", step=1)
    assert "extra" not in off
