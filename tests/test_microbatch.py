"""Token-budget micro-batches and packing: the partition on a hand-made case, and the same update (and the
same old log-probs) as one big padded batch."""

import pytest
import torch

from mtp_occ.config import AlgoConfig, ConcatOrder, ConfigError, ModelConfig, compose
from mtp_occ.engine import TorchEngine
from mtp_occ.microbatch import cut, micro_batch_rows, token_budget_rows
from mtp_occ.model.load import build_tiny
from mtp_occ.regimes import build_regime
from mtp_occ.rollout.hf import RolloutBatch
from mtp_occ.update import minibatch_rows, old_logprobs, rl_update

V = 23


def _mask(spans, T=10):
    m = torch.zeros(len(spans), T, dtype=torch.long)
    for b, (f, e) in enumerate(spans):
        m[b, f:e + 1] = 1
    return m


def test_token_budget_partition_by_hand():
    # real spans (first, last column): lengths 8, 3, 6, 2, 5
    attn = _mask([(1, 8), (4, 6), (2, 7), (5, 6), (3, 7)])
    # padded, budget 12: sorted 0(8) 2(6) 4(5) 1(3) 3(2). [0]: width 8; +2 -> 2 rows x cols 1..8 = 16 > 12.
    # [2]: width 6; +4 -> 2 x cols 2..7 = 12 ok; +1 -> 3 x 6 = 18 > 12. [1]: 3; +3 -> 2 x cols 4..6 = 6 ok.
    parts = token_budget_rows(attn, 12, packed=False)
    assert [p.tolist() for p in parts] == [[0], [2, 4], [1, 3]]
    # packed, budget 12: 8 | 6+5=11 | 3+2=5
    assert [p.tolist() for p in token_budget_rows(attn, 12, packed=True)] == [[0], [2, 4], [1, 3]]
    # packed, budget 14: 8+6=14 | 5+3+2=10
    assert [p.tolist() for p in token_budget_rows(attn, 14, packed=True)] == [[0, 2], [4, 1, 3]]
    # a row cap of 2 splits the last bin
    assert [p.tolist() for p in token_budget_rows(attn, 14, packed=True, max_rows=2)] == [[0, 2], [4, 1], [3]]
    with pytest.raises(ConfigError, match="algo.max_tokens_per_micro_batch"):
        token_budget_rows(attn, 7, packed=True)


def _batch(seed=0, B=8, P=5, R=9):
    """Left-padded prompts of 2..P tokens, right-padded responses of 1..R tokens; groups of 2 rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(B, P + R, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for b in range(B):
        p, r = int(torch.randint(2, P + 1, (1,), generator=g)), int(torch.randint(1, R + 1, (1,), generator=g))
        ids[b, P - p:P + r] = torch.randint(3, V, (p + r,), generator=g)
        attn[b, P - p:P + r], resp[b, P:P + r] = 1, 1
    return RolloutBatch(ids, attn, resp, resp.sum(1), torch.zeros(B, dtype=torch.bool), torch.arange(B) // 2,
                        [""] * B, 0), torch.randn(B, generator=g)


def test_cut_trims_to_the_real_columns_and_keeps_alignment():
    batch, _ = _batch()
    part, cols = cut(batch, torch.tensor([1, 3]), trim=True)
    real = batch.attention_mask_BT[[1, 3]].bool().any(0).nonzero().squeeze(1)
    assert (cols.start, cols.stop) == (int(real[0]), int(real[-1]) + 1)
    assert torch.equal(part.input_ids_BT, batch.input_ids_BT[[1, 3]][:, cols])
    assert part.attention_mask_BT.sum() == batch.attention_mask_BT[[1, 3]].sum()


class RecordingEngine(TorchEngine):
    """The plain engine, keeping every update's summed gradients (what the optimizer is handed)."""

    def __init__(self, model, algo, *, total_steps):
        super().__init__(model, algo, total_steps=total_steps)
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self, finite, before_clip=None):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        return super().step(finite, before_clip)


def _model():
    return build_tiny(ModelConfig(name="t", hidden_size=32, num_heads=4, intermediate_size=64,
                                  concat_order=ConcatOrder.hidden_first), V, 0, 1, 2, seed=0)


def _run(regime, agg, extra, level="token"):
    # lr 1e-9: Adam moves every weight by ~lr whatever its gradient, so the second update's gradients see
    # (almost) the same weights in both runs and differences stay at round-off
    cfg = compose([f"regime={regime}", "algo.prompts_per_step=4", "algo.group_size=2", "algo.updates_per_step=2",
                   "algo.lr=1e-9", f"algo.agg={agg}", f"algo.level={level}", *extra])
    model = _model()
    batch, adv = _batch()
    old = old_logprobs(model, batch, cfg.algo, 1.0)
    engine = RecordingEngine(model, cfg.algo, total_steps=cfg.steps)
    res = rl_update(model, engine, build_regime(cfg.regime), batch, old, adv, cfg.algo,
                    coef_scale=1.0, temperature=1.0, group_size=2)
    return cfg, model, old, res.metrics, engine.grads


# several micro-batches of 1-3 rows per mini-batch (the synthetic rows are 14 tokens; the rollout lengths
# only bound the budget at compose time)
BUDGET = ["algo.max_tokens_per_micro_batch=24", "rollout.max_prompt_len=8", "rollout.max_new_tokens=16"]


@pytest.mark.parametrize("regime,agg,level", [("policy", "token-mean", "token"), ("ce", "seq-mean-token-mean", "token"),
                                              ("detach", "seq-mean-token-sum", "token"),
                                              ("policy", "seq-mean-token-mean", "sequence")])
@pytest.mark.parametrize("extra", [BUDGET, [*BUDGET, "algo.pack_sequences=true"], ["algo.pack_sequences=true"],
                                   ["algo.micro_batch_size=3"]])
def test_token_budget_and_packing_give_the_one_big_batch_update(regime, agg, level, extra):
    _, _, ref_old, ref_m, ref_g = _run(regime, agg, [], level)
    cfg, new, new_old, new_m, new_g = _run(regime, agg, extra, level)
    batch, _ = _batch()
    n_micro = len(micro_batch_rows(batch.select(torch.arange(4)), cfg.algo))
    assert n_micro > 1 or "algo.pack_sequences=true" in extra  # the case really accumulates
    assert torch.allclose(new_old, ref_old, atol=1e-6)
    assert len(ref_g) == len(new_g) == 2
    for u, (gr, gn) in enumerate(zip(ref_g, new_g, strict=True)):
        assert gr.keys() == gn.keys()
        for k in gr:
            assert torch.allclose(gn[k], gr[k], atol=1e-6, rtol=1e-4), (u, k)
        assert sum(float(g.abs().sum()) for g in gr.values()) > 0
    for k in ("loss/pg", "loss/mtp", "grad/norm", "grad/mtp_norm"):
        assert new_m[k] == pytest.approx(ref_m[k], rel=1e-4, abs=1e-7), k
    moved = [not torch.equal(a, b) for a, b in zip(_model().state_dict().values(), new.state_dict().values(), strict=True)]
    assert any(moved)


def test_packing_refuses_an_attention_that_cannot_separate_sequences():
    cfg = compose(["algo.prompts_per_step=4", "algo.group_size=2", "algo.updates_per_step=2",
                   "algo.pack_sequences=true"])
    model = build_tiny(ModelConfig(name="t", hidden_size=32, num_heads=4, intermediate_size=64), V, 0, 1, 2)
    model.lm.config._attn_implementation = "paged_attention"
    batch, _ = _batch()
    with pytest.raises(ConfigError, match="algo.pack_sequences"):
        old_logprobs(model, batch, cfg.algo, 1.0)


def _run_occ(extra, monkeypatch=None):
    """Two occ updates of 4 rows with logp_old perturbed, so λ is well away from 0 at both."""
    cfg = compose(["regime=occ", "algo.prompts_per_step=4", "algo.group_size=2", "algo.updates_per_step=2",
                   "algo.lr=1e-9", *extra])
    model = _model()
    batch, adv = _batch()
    old = old_logprobs(model, batch, cfg.algo, 1.0)
    old = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1))
    engine = RecordingEngine(model, cfg.algo, total_steps=cfg.steps)
    res = rl_update(model, engine, build_regime(cfg.regime), batch, old, adv, cfg.algo,
                    coef_scale=1.0, temperature=1.0, group_size=2)
    return cfg, res.metrics, engine.grads


@pytest.mark.parametrize("extra", [["algo.micro_batch_size=3"], BUDGET, [*BUDGET, "algo.pack_sequences=true"]])
def test_occ_lambda_is_one_per_update_whatever_the_micro_batches(extra, monkeypatch):
    import mtp_occ.update as update

    real = update._update_statistics
    monkeypatch.setattr(update, "_update_statistics", None)  # one micro-batch: no extra pass may run
    _, ref_m, ref_g = _run_occ([])
    monkeypatch.setattr(update, "_update_statistics", real)
    cfg, new_m, new_g = _run_occ(extra)
    for rows in minibatch_rows(4, 2, 2):
        assert len(micro_batch_rows(_batch()[0].select(rows), cfg.algo)) > 1  # the case really accumulates
    assert abs(ref_m["occ/lambda"]) > 0.05
    for k in ("occ/lambda", "occ/c_hat", "occ/v2_hat", "loss/mtp", "loss/pg", "mtp/ce"):
        assert new_m[k] == pytest.approx(ref_m[k], rel=1e-4, abs=1e-7), k
    assert len(ref_g) == len(new_g) == 2
    for gr, gn in zip(ref_g, new_g, strict=True):
        for k in gr:
            assert torch.allclose(gn[k], gr[k], atol=1e-6, rtol=1e-4), k
    # the released code's per-micro-batch λ does depend on the micro-batches
    _, micro_m, micro_g = _run_occ([*extra, "regime.lambda_per=micro_batch"])
    _, micro_ref_m, _ = _run_occ(["regime.lambda_per=micro_batch"])
    assert micro_ref_m["occ/lambda"] == pytest.approx(ref_m["occ/lambda"], rel=1e-6)  # one micro-batch: the same
    assert abs(micro_m["loss/mtp"] - ref_m["loss/mtp"]) > 1e-3 * abs(ref_m["loss/mtp"])


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 12])
def test_mini_batches_are_the_single_process_ones_for_any_world_size(world):
    """Each rank holds a contiguous block of the step's groups; the union over ranks of update u's groups
    must be the single-process update u, also when a rank holds fewer groups than there are updates."""
    n_global, G, updates = 12, 3, 4
    single = [set((rows // G).tolist()) for rows in minibatch_rows(n_global, G, updates)]
    share = n_global // world
    union = [set() for _ in range(updates)]
    for r in range(world):
        for u, rows in enumerate(minibatch_rows(share, G, updates, first_group=r * share)):
            assert torch.equal(rows.view(-1, G) % G, torch.arange(G).expand(len(rows) // G, G))  # whole groups
            union[u] |= {r * share + g for g in (rows // G).tolist()}
    assert union == single == [{u, u + 4, u + 8} for u in range(updates)]


def test_an_empty_share_of_a_mini_batch_has_no_micro_batches():
    batch, _ = _batch()
    empty = batch.select(torch.arange(0))
    for algo in (AlgoConfig(), AlgoConfig(micro_batch_size=2), AlgoConfig(max_tokens_per_micro_batch=64)):
        assert micro_batch_rows(empty, algo) == []
