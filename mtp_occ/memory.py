"""The memory plan: what one rank holds, by phase, against a device's memory, with the arithmetic shown.

    python -m mtp_occ.run experiment=paper_mimo7b_dapo dry_run=true       # WORLD_SIZE=128 to preview 128 ranks
    plan = memory_plan(cfg, world=128); print(plan.render([80, 141]))

Two phases share a GPU with the colocated vLLM engine (`mtp_occ.rollout.vllm` sleeps at level 1 while the
trainer runs: weights offloaded to the CPU, KV cache freed):
- rollout:  model states + vLLM's share (`rollout.gpu_memory_utilization` × device);
- training: model states + ZeRO-3 gathered parameters + communication buckets + activations of one
  micro-batch + the log-prob chunk and the head's gradient + vLLM asleep.
A plan fits when both phases stay under `USABLE` (90%) of the device: the rest is CUDA context, NCCL buffers
and allocator fragmentation, which depend on the machine.

Estimates and their sources (1 GB = 1e9 bytes throughout):
- Model states (ZeRO paper, Rajbhandari et al. 2020, mixed-precision Adam: 2Ψ params + 2Ψ grads + 12Ψ
  optimizer; stage 1 partitions the optimizer, 2 also the gradients, 3 also the parameters, over the world
  size); without DeepSpeed, AdamW on `model.dtype` weights: params, grads and two moments in that dtype.
- ZeRO-3 gathered: the embedding and the LM head are external parameters of the root module (the MTP
  layers and the chunked log-probs read them, `mtp_occ.engine`), so they stay gathered for the whole forward
  and backward (ZeRO-3's hooks on the root module's outputs re-gather them), plus one decoder block
  and DeepSpeed's default prefetch bucket (5e7 parameters).
- Activations per token and decoder layer, in the model's dtype (bf16: 2 bytes): the RMSNorms' float32
  input and output (6h each), q, k, v and the attention output that flash-attention saves (2(h + 2·kv) +
  2h), the SwiGLU MLP's gate, up, activation and product (8i): 16h + 4kv + 8i bytes, the same order as
  Korthikanti et al.'s 34·h for a GPT layer with a 4h MLP. With gradient checkpointing (HF, per decoder
  layer) a layer keeps only its input (2h) and one layer at a time is recomputed in full. The MTP layers
  are not checkpointed. No T² attention term: flash-attention / SDPA kernels keep O(T) per layer (eager
  attention would add heads × T² per layer).
- Log-probs (`mtp_occ.model.logprob`): one chunk of float32 logits plus its cast in the matmul dtype,
  the selected hidden states per head, and the head's float32 gradient accumulator with one [V,D] tensor in
  the head's dtype (the product buffer every chunk reuses, then the final cast).
- vLLM: weights (2Ψ_LM) + KV cache (2 · layers · kv · 2 bytes per token) inside its share; a share whose
  KV cache holds less than a rank's rollouts still runs (in waves, slower). Asleep: `VLLM_ASLEEP_GB`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from mtp_occ.config import Config

GB = 1e9
USABLE = 0.90  # share of device memory a plan may use (context, NCCL, fragmentation take the rest)
VLLM_ASLEEP_GB = 2.0  # vLLM after sleep(level=1): CUDA graphs and context stay on the device (estimate)
ZERO_BUCKET = 5e8  # DeepSpeed's default reduce/allgather bucket, in elements (bf16/fp32 grads)
ZERO3_PREFETCH = 5e7  # DeepSpeed's default stage3_prefetch_bucket_size, in parameters
DEVICES_GB = (80.0, 141.0)  # A100/H100 80 GB and H200 141 GB, printed by the dry run


@dataclass(frozen=True)
class Arch:
    """The dimensions the plan needs (from a model's config.json)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def block_params(self) -> int:
        h, kv = self.hidden, self.kv
        attn = h * (h + 2 * kv) + h * h + ((h + 2 * kv) if self.qkv_bias else 0)
        return attn + 3 * h * self.intermediate + 2 * h

    def params(self, depth: int) -> tuple[int, int]:
        """(LM parameters, MTP parameters): an MTP layer is a block + a 2h→h projection + three norms."""
        h = self.hidden
        lm = self.vocab * h * (1 if self.tied else 2) + self.layers * self.block_params() + h
        return lm, depth * (self.block_params() + 2 * h * h + 3 * h)


# MiMo-7B-RL's config.json (Qwen2 backbone with q/k/v biases, untied head), used when no local copy exists
KNOWN_ARCHS = {"XiaomiMiMo/MiMo-7B-RL": Arch(4096, 36, 32, 8, 11008, 151680, qkv_bias=True),
               "XiaomiMiMo/MiMo-7B-Base": Arch(4096, 36, 32, 8, 11008, 151680, qkv_bias=True),
               "Qwen/Qwen2.5-7B": Arch(3584, 28, 28, 4, 18944, 152064, qkv_bias=True)}


def model_arch(cfg: Config) -> Arch | None:
    """The model's dimensions without loading weights: the config for `source=tiny`, a local config.json
    (a directory or the HF cache, never the network), else `KNOWN_ARCHS`; None when unknown."""
    m = cfg.model
    if m.source.value == "tiny":  # the task's tokenizer sets the vocabulary (a compose-time check)
        from mtp_occ.tasks import TASKS

        vocab = len(TASKS[cfg.data.source].tokenizer())
        return Arch(m.hidden_size, m.num_layers, m.num_heads, m.num_heads, m.intermediate_size, vocab)
    try:
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(m.name_or_path, local_files_only=True, trust_remote_code=m.trust_remote_code)
        return Arch(c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                    getattr(c, "num_key_value_heads", None) or c.num_attention_heads, c.intermediate_size, c.vocab_size,
                    bool(getattr(c, "tie_word_embeddings", False)), "qwen2" in c.model_type or "mimo" in c.model_type)
    except Exception:  # no local copy: fall back to the table
        return KNOWN_ARCHS.get(m.name_or_path)


@dataclass
class Line:
    label: str
    gb: float
    how: str  # the arithmetic


@dataclass
class MemoryPlan:
    world: int
    tokens: int  # tokens in one micro-batch's forward
    rollout: list[Line] = field(default_factory=list)
    training: list[Line] = field(default_factory=list)
    vllm_util: float = 0.0
    notes: list[str] = field(default_factory=list)
    per_token_gb: float = 0.0  # training memory per micro-batch token (for the advice)

    def peaks(self, device_gb: float) -> tuple[float, float]:
        """(rollout, training) peak in GB on a device of `device_gb`."""
        return (sum(x.gb for x in self.rollout) + self.vllm_util * device_gb, sum(x.gb for x in self.training))

    def fits(self, device_gb: float) -> bool:
        return max(self.peaks(device_gb)) <= USABLE * device_gb

    def advice(self, device_gb: float) -> list[str]:
        """What to change when the plan does not fit `device_gb`."""
        roll, train = self.peaks(device_gb)
        limit, out = USABLE * device_gb, []
        if roll > limit:
            states = roll - self.vllm_util * device_gb
            out.append(f"rollout phase {roll:.1f} GB > {limit:.1f}: set rollout.gpu_memory_utilization <= "
                       f"{max(0.0, math.floor(100 * (limit - states) / device_gb) / 100):.2f}, or shard the model "
                       "states further "
                       "(deepspeed=zero3, more ranks, deepspeed.offload_optimizer=true)")
        if train > limit:
            spare = limit - (train - self.per_token_gb * self.tokens)
            n = int(spare / self.per_token_gb) // 1024 * 1024 if self.per_token_gb else 0
            out.append(f"training phase {train:.1f} GB > {limit:.1f}: " +
                       (f"set algo.max_tokens_per_micro_batch={n} (fits {n} tokens at "
                        f"{self.per_token_gb * 1e3:.3f} MB/token)" if n > 0 else "no token budget fits") +
                       "; model.gradient_checkpointing=true and a smaller algo.logprob_chunk_mb lower the per-token "
                       "and fixed parts")
        return out

    def render(self, devices_gb: tuple[float, ...] | list[float] = DEVICES_GB) -> str:
        rows = [f"memory plan per rank (world {self.world}, {self.tokens:,} tokens per micro-batch; 1 GB = 1e9 B)"]
        for phase, lines in (("rollout", self.rollout), ("training", self.training)):
            rows.append(f"  {phase}:")
            rows += [f"    {x.label:<34} {x.gb:8.2f} GB   {x.how}" for x in lines]
            if phase == "rollout":
                rows.append(f"    {'vLLM share':<34} {self.vllm_util:.2f} × device   rollout.gpu_memory_utilization")
        rows += [f"  note: {n}" for n in self.notes]
        for d in devices_gb:
            roll, train = self.peaks(d)
            verdict = "fits" if self.fits(d) else "DOES NOT FIT"
            rows.append(f"  on {d:g} GB: rollout {roll:.1f} GB, training {train:.1f} GB, limit {USABLE:.0%} = "
                        f"{USABLE * d:.1f} GB -> {verdict}")
            rows += [f"    change: {a}" for a in self.advice(d)]
        return "\n".join(rows)


def _compute_bytes(cfg: Config) -> int:
    """Bytes per element of weights and activations in the forward (DeepSpeed bf16 casts the model)."""
    bf16 = cfg.deepspeed.enabled and cfg.deepspeed.bf16
    return 2 if bf16 or cfg.model.dtype != "float32" else 4


def _states(cfg: Config, psi: int, world: int) -> list[Line]:
    """Parameters, gradients and optimizer states per rank (module docstring)."""
    z = cfg.deepspeed
    stage = z.stage if z.enabled else 0
    n = world if z.enabled else 1
    if z.enabled and z.bf16:
        p, g, o, kind = 2, 2, 12, "bf16 params/grads, fp32 master + Adam"
    else:
        b = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype]
        p, g, o, kind = b, b, 2 * b, f"{cfg.model.dtype} params/grads/Adam moments"
    offload = z.enabled and z.offload_optimizer
    div = {"params": n if stage >= 3 else 1, "grads": n if stage >= 2 else 1, "optimizer": n if stage >= 1 else 1}
    out = []
    for name, per in (("params", p), ("grads", g), ("optimizer", o)):
        if name == "optimizer" and offload:
            out.append(Line("optimizer states", 0.0, "offloaded to CPU (deepspeed.offload_optimizer)"))
            continue
        out.append(Line(name, per * psi / div[name] / GB, f"{per} B × {psi:,} params" +
                        (f" / {div[name]} ranks (ZeRO-{stage})" if div[name] > 1 else "") +
                        (f"  [{kind}]" if name == "params" else "")))
    return out


def _tokens(cfg: Config, world: int) -> int:
    """Tokens in one micro-batch's forward: the token budget, else rows × the longest possible sequence."""
    a, r = cfg.algo, cfg.rollout
    if a.max_tokens_per_micro_batch:
        return a.max_tokens_per_micro_batch
    rows = max(1, a.prompts_per_step * a.group_size // a.updates_per_step // world)
    return min(a.micro_batch_size or rows, rows) * (r.max_prompt_len + r.max_new_tokens)


def _activations(cfg: Config, arch: Arch, n: int) -> tuple[list[Line], float]:
    """Activation lines for `n` tokens and the per-token total in GB."""
    h, kv, i, L, K = arch.hidden, arch.kv, arch.intermediate, arch.layers, cfg.model.mtp_depth
    act = _compute_bytes(cfg)
    layer = (16 * h + 4 * kv + 8 * i) * act // 2  # bytes per token (module docstring), scaled to the dtype
    lines = []
    if cfg.model.gradient_checkpointing:
        lines.append(Line("backbone (checkpointed)", (L * act * h + layer) * n / GB,
                          f"({L} layers × {act}·h + one recomputed layer {layer:,} B) × {n:,} tokens"))
    else:
        lines.append(Line("backbone", L * layer * n / GB, f"{L} layers × {layer:,} B × {n:,} tokens"))
    mtp = K * (layer + 22 * h * act // 2)
    lines.append(Line("MTP layers (not checkpointed)", mtp * n / GB,
                      f"{K} × ({layer:,} + concat/norms {22 * h * act // 2:,}) B × {n:,} tokens"))
    other = (5 * h + (1 + K) * h) * act
    lines.append(Line("embeddings, final norm, head inputs", other * n / GB, f"{other:,} B × {n:,} tokens"))
    if cfg.model.attn_implementation == "eager":
        lines.append(Line("eager attention scores", L * arch.heads * n * n * act / GB, f"{L} × {arch.heads} heads × T²"))
    return lines, sum(x.gb for x in lines) / n


def _logprob(cfg: Config, arch: Arch, n: int) -> list[Line]:
    from mtp_occ.model.logprob import chunk_tokens

    V, h, K = arch.vocab, arch.hidden, cfg.model.mtp_depth
    p = _compute_bytes(cfg)
    if cfg.algo.logprob_chunk_mb == 0:
        return [Line("dense log-probs (reference path)", 3 * (1 + K) * n * V * 4 / GB,
                     f"3 × (1+{K}) heads × {n:,} × {V:,} × 4 B")]
    c, cast = min(chunk_tokens(cfg.algo.logprob_chunk_mb, V), n), (p if p < 4 else 0)  # fp32: the cast is a no-op
    return [Line("log-prob chunk", c * V * (4 + cast) / GB, f"{c:,} tokens × {V:,} × (4 + {cast}) B"),
            Line("log-prob head gradient", (4 + cast) * V * h / GB, f"fp32 accumulator + product buffer / cast: {4 + cast} B × {V:,} × {h}")]


def memory_plan(cfg: Config, world: int | None = None) -> MemoryPlan | None:
    """The plan for `cfg` on `world` ranks (default: $WORLD_SIZE or 1); None if the architecture is unknown."""
    arch = model_arch(cfg)
    if arch is None:
        return None
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    lm, mtp = arch.params(cfg.model.mtp_depth)
    psi, n = lm + mtp, _tokens(cfg, world)
    plan = MemoryPlan(world, n)
    states = _states(cfg, psi, world)
    plan.rollout = list(states)
    z3 = cfg.deepspeed.enabled and cfg.deepspeed.stage == 3
    plan.training = list(states)
    pb = _compute_bytes(cfg)
    if z3:
        live = arch.vocab * arch.hidden * (1 if arch.tied else 2) + arch.block_params() + ZERO3_PREFETCH
        plan.training.append(Line("ZeRO-3 gathered parameters", pb * live / GB,
                                  f"{pb} B × (embedding + head + one block + prefetch {ZERO3_PREFETCH:.0e})"))
    if cfg.deepspeed.enabled and cfg.deepspeed.stage >= 1:
        plan.training.append(Line("ZeRO buckets", pb * ZERO_BUCKET / GB, f"{pb} B × {ZERO_BUCKET:.0e} elements"))
    acts, per_token = _activations(cfg, arch, n)
    plan.training += acts + _logprob(cfg, arch, n)
    plan.per_token_gb = per_token
    vllm = cfg.rollout.backend.value == "vllm"
    if vllm:
        plan.vllm_util = cfg.rollout.gpu_memory_utilization
        plan.training.append(Line("vLLM asleep (level 1)", VLLM_ASLEEP_GB, "weights on CPU, KV cache freed (estimate)"))
        kv_tok = 2 * arch.layers * arch.kv * 2
        rows = max(1, cfg.algo.prompts_per_step * cfg.algo.group_size // world)
        need = rows * (cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens) * kv_tok
        plan.notes.append(f"vLLM needs weights {2 * lm / GB:.1f} GB + KV cache for {rows} rollouts of up to "
                          f"{cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens:,} tokens at {kv_tok:,} B/token = "
                          f"{need / GB:.1f} GB; a smaller share generates in waves")
    dense = (1 + cfg.model.mtp_depth) * n * arch.vocab * 4
    plan.notes.append(f"the dense [B,T,V] path would hold >= (1+K) × {n:,} × {arch.vocab:,} × 4 B = {dense / GB:.1f} GB "
                      "of float32 logits alone")
    plan.notes.append(f"training memory grows by {per_token * 1e3:.3f} MB per micro-batch token")
    return plan
