"""The vLLM backend's own code on CPU, against a stand-in engine that speaks vLLM's offline API
(`generate` with per-request seeds and processed log-probs, `collective_rpc`, `load_weights`, `get_metrics`,
sleep/wake). What this checks is ours: the batch layout and log-prob alignment, weight naming for the
policy and the MiMo drafter, ZeRO-3 gathering, and the acceptance counters. The real engine is checked by
`tests/gpu/` (`bash tests/gpu/run_gpu_checks.sh`)."""

import copy
import re
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtp_occ.config import ConcatOrder, ModelConfig
from mtp_occ.model.load import MIMO_PREFIX, build_tiny, mimo_to_ours_key
from mtp_occ.rollout import VllmBackend
from mtp_occ.rollout.vllm import SPEC_COUNTERS, VllmRollout, logprob_mismatch
from mtp_occ.tasks.arith import build_tokenizer
from mtp_occ.update import old_logprobs

REPO = Path(__file__).resolve().parent.parent
# the parameter names vLLM's MiMo MTP drafter accepts (its load_weights remaps exactly these)
MIMO_DRAFTER_NAME = re.compile(r"^model\.mtp_layers\.\d+\.(token_layernorm|hidden_layernorm|input_proj|final_layernorm|"
                               r"input_layernorm|self_attn|post_attention_layernorm|mlp)\.|^model\.embed_tokens\.weight$|"
                               r"^lm_head\.weight$")


class StandInModel:
    """The worker-side model: a separate copy whose only way in is `load_weights` (strict on names)."""

    def __init__(self, module, rename=lambda k: k):
        self.module, self.rename, self.loaded = module, rename, []

    def load_weights(self, weights):
        params = dict(self.module.named_parameters())
        for name, t in weights:
            self.loaded.append(name)
            params[self.rename(name)].data.copy_(t)  # KeyError on a name the model does not have
        return set(self.loaded)


class StandInLLM:
    """vLLM's `LLM` as our backend uses it: samples from its own copy of the policy."""

    def __init__(self, model, speculative=False):
        self.lm = copy.deepcopy(model.lm).eval()
        self.worker = SimpleNamespace(model_runner=SimpleNamespace(model=StandInModel(self.lm)))
        if speculative:
            self.mtp = copy.deepcopy(model.mtp)
            self.shared = copy.deepcopy(model.lm)  # where a drafter keeps its embedding / head

            def rename(name):
                assert MIMO_DRAFTER_NAME.match(name), name
                return name if not name.startswith(MIMO_PREFIX) else "mtp." + mimo_to_ours_key(name)

            holder = torch.nn.ModuleDict({"mtp": self.mtp, "model": self.shared.model})
            holder.lm_head = self.shared.lm_head
            self.worker.model_runner.drafter = SimpleNamespace(model=StandInModel(holder, rename))
        self.counters = dict.fromkeys(SPEC_COUNTERS, 0.0)
        self.asleep = False

    def collective_rpc(self, fn):
        return [fn(self.worker)]

    def sleep(self, level):
        self.asleep = True

    def wake_up(self):
        self.asleep = False

    def get_metrics(self):
        return [SimpleNamespace(name=k, value=v) for k, v in self.counters.items()]

    @torch.no_grad()
    def generate(self, requests, params, use_tqdm=False):
        assert not self.asleep
        outs = []
        for req, p in zip(requests, params, strict=True):
            g = torch.Generator().manual_seed(p.seed)
            toks, out, lps = list(req["prompt_token_ids"]), [], []
            for _ in range(p.max_tokens):
                logits = self.lm(torch.tensor([toks])).logits[0, -1].float() / p.temperature
                lp = torch.log_softmax(logits, -1)  # processed log-probs: after temperature
                t = int(torch.multinomial(lp.exp(), 1, generator=g))
                toks.append(t), out.append(t), lps.append({t: SimpleNamespace(logprob=float(lp[t]))})
                if t == self.eos:
                    break
            self.counters["vllm:spec_decode_num_draft_tokens"] += len(out)
            self.counters["vllm:spec_decode_num_accepted_tokens"] += len(out) // 2
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=out, logprobs=lps)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    mod.TokensPrompt = lambda **kw: dict(kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)


def _tiny(tok):
    """The test policy as first built (seed 0): also what a stale engine holds."""
    return build_tiny(ModelConfig(name="t", hidden_size=32, num_heads=4, intermediate_size=64, mtp_depth=1,
                                  concat_order=ConcatOrder.hidden_first), vocab_size=len(tok),
                      pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, seed=0)


@pytest.fixture
def policy():
    tok = build_tokenizer()
    return _tiny(tok), tok


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


PROMPTS = ["1+2=", "7-3+1=", "9+9=", "4="]  # different lengths: the batch is left-padded


def _rollout(model, tok, llm, temperature=0.7, n=3):
    llm.eos = tok.eos_token_id
    backend = VllmBackend(VllmRollout(llm, speculative=hasattr(llm, "mtp")))
    backend.release()
    backend.prepare(model)  # wake + sync, as before every step's rollouts
    batch = backend.generate(tok, PROMPTS, n, temperature=temperature, max_new_tokens=12, max_prompt_len=16,
                             seed=5, row_keys=torch.arange(len(PROMPTS) * n) + 100)
    backend.release()
    return backend, batch


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batch_layout_and_logprobs_match_the_trainer(fake_vllm, policy, temperature):
    model, tok = policy
    _perturb(model)  # the engine starts from stale weights: only the sync makes the log-probs agree
    llm = StandInLLM(_tiny(tok))
    _, batch = _rollout(model, tok, llm, temperature)
    B, T = batch.input_ids_BT.shape
    assert B == len(PROMPTS) * 3 and batch.prompt_idx_B.tolist() == [i for i in range(len(PROMPTS)) for _ in range(3)]
    # the response mask covers exactly the generated tokens, EOS included, no padding
    for b in range(B):
        resp = batch.input_ids_BT[b][batch.response_mask_BT[b].bool()].tolist()
        assert len(resp) == int(batch.response_len_B[b]) >= 1
        assert (tok.eos_token_id in resp) != bool(batch.truncated_B[b])
        if tok.eos_token_id in resp:
            assert resp.index(tok.eos_token_id) == len(resp) - 1
    assert ((batch.attention_mask_BT - batch.response_mask_BT) >= 0).all()
    # prediction-aligned: the trainer's recomputed log-probs equal the engine's at every response token
    old_BT = old_logprobs(model, batch, 0, temperature)
    loss_BT = torch.zeros_like(batch.response_mask_BT)
    loss_BT[:, :-1] = batch.response_mask_BT[:, 1:]
    assert logprob_mismatch(old_BT, batch.rollout_logprob_BT, loss_BT) < 1e-5
    assert (batch.rollout_logprob_BT * (1 - loss_BT) == 0).all()
    # without the sync the engine would have sampled from the stale policy: a visible mismatch
    stale = StandInLLM(_tiny(tok))
    stale.eos = tok.eos_token_id
    b2, lp2 = VllmRollout(stale, speculative=False).generate(
        tok, PROMPTS, 3, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=12, max_prompt_len=16,
        row_keys=torch.arange(12), seed=5)
    l2 = torch.zeros_like(b2.response_mask_BT)
    l2[:, :-1] = b2.response_mask_BT[:, 1:]
    assert logprob_mismatch(old_logprobs(model, b2, 0, temperature), lp2, l2) > 1e-3


def test_rollouts_are_seeded_per_request(fake_vllm, policy):
    model, tok = policy
    _, a = _rollout(model, tok, StandInLLM(model))
    _, b = _rollout(model, tok, StandInLLM(model))
    assert torch.equal(a.input_ids_BT, b.input_ids_BT)
    rows = a.input_ids_BT.tolist()
    assert len({tuple(r) for r in rows}) > len(PROMPTS)  # samples of one prompt differ


def test_speculative_sync_reaches_the_mimo_drafter_and_acceptance_is_per_step(fake_vllm, policy):
    model, tok = policy
    llm = StandInLLM(model, speculative=True)
    _perturb(model)
    backend, _ = _rollout(model, tok, llm)
    for (name, ours), (_, theirs) in zip(model.mtp.named_parameters(), llm.mtp.named_parameters(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(model.lm.model.embed_tokens.weight, llm.shared.model.embed_tokens.weight)
    assert torch.equal(model.lm.lm_head.weight, llm.shared.lm_head.weight)
    drafter_names = llm.worker.model_runner.drafter.model.loaded
    assert any(n.startswith("model.mtp_layers.0.self_attn.") for n in drafter_names)
    assert "model.mtp_layers.0.input_proj.weight" in drafter_names
    # counters are cumulative in vLLM; the metric is this step's accepted / proposed
    m = backend.metrics()
    assert m["rollout/spec_acceptance"] == pytest.approx(llm.counters[SPEC_COUNTERS[1]] / llm.counters[SPEC_COUNTERS[0]])
    llm.counters[SPEC_COUNTERS[0]] += 10
    llm.counters[SPEC_COUNTERS[1]] += 9
    assert backend.metrics()["rollout/spec_acceptance"] == pytest.approx(0.9)
    assert backend.metrics() == {}  # nothing proposed since


def test_tis_weights_and_mismatch_metric_from_the_batch(fake_vllm, policy):
    from mtp_occ.train import correct_rollout_mismatch

    model, tok = policy
    _, batch = _rollout(model, tok, StandInLLM(model))
    old_BT = old_logprobs(model, batch, 0, 0.7)
    shifted = old_BT + 0.5  # pretend the sampler was more confident than the trainer
    batch.rollout_logprob_BT = shifted * (batch.rollout_logprob_BT != 0)
    m = correct_rollout_mismatch(batch, old_BT, tis_cap=2.0)
    assert m["rollout/logprob_mismatch"] == pytest.approx(0.5, abs=1e-5)
    mask = batch.rollout_logprob_BT != 0
    assert torch.allclose(batch.token_weight_BT[mask], torch.full_like(old_BT[mask], torch.exp(torch.tensor(-0.5))))


ZERO3_SCRIPT = """
import os, torch
from mtp_occ.config import compose
from mtp_occ.dist import init_distributed
from mtp_occ.engine import build_engine
from mtp_occ.model.load import build_tiny
from mtp_occ.rollout.vllm import full_named_parameters

d = init_distributed("cpu")
cfg = compose(["deepspeed=zero3", "algo.prompts_per_step=2", "algo.group_size=2", "algo.updates_per_step=1",
               "eval.enabled=false", "wandb.mode=disabled"])
model = build_tiny(cfg.model, vocab_size=40, pad_id=0, bos_id=1, eos_id=2, seed=0)
full = {k: v.clone() for k, v in model.lm.named_parameters()}
engine = build_engine(model, cfg, d.world)
assert all(p.numel() == 0 or hasattr(p, "ds_id") for p in model.lm.parameters())
assert any(p.data.numel() == 0 for p in model.lm.parameters()), "ZeRO-3 did not partition"
got = dict(full_named_parameters(model.lm))
assert got.keys() == full.keys()
for k in full:
    assert torch.equal(got[k], full[k]), k
print("ok", len(got))
"""


@pytest.mark.slow
def test_zero3_parameters_are_gathered_for_the_sync(tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29719", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    import os

    p = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **env})
    assert p.returncode == 0 and "ok" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


def test_evaluation_through_the_engine_leaves_the_acceptance_counters_to_training(fake_vllm, policy):
    from mtp_occ.config import compose
    from mtp_occ.eval.policy import make_generate_fn

    model, tok = policy
    llm = StandInLLM(model, speculative=True)
    llm.eos = tok.eos_token_id
    backend = VllmBackend(VllmRollout(llm, speculative=True))
    cfg = compose(["eval.max_new_tokens=8", "eval.temperature=1.0"])
    completions = make_generate_fn(model, tok, cfg, seed=0, backend=backend)(PROMPTS, 2)
    assert len(completions) == len(PROMPTS) and all(len(c) == 2 for c in completions)
    assert llm.counters[SPEC_COUNTERS[0]] > 0 and backend.metrics() == {}  # drafts happened, none left over
