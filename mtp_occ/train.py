"""The RL training loop, top to bottom: sample prompts -> rollouts -> rewards -> group advantages ->
`updates_per_step` mini-batch updates of `pg_loss + mtp_term` -> metrics -> checkpoint -> evaluation.

The loop never branches on the regime: the regime object supplies the gradient path, the MTP loss and
λ (see `mtp_occ.regimes`). Everything a resumed run needs is in the checkpoint, and rollouts, mini-batch
shuffles and evaluation sampling are seeded by (seed, step), so a run stopped after step k and resumed
ends with exactly the metrics of an uninterrupted run (on CPU).

Departures from the paper's verl setup: rollouts come from HF `generate` (`rollout=hf`) unless
`rollout=vllm`; the old log-probs are recomputed by the trainer (as verl does); no KL and no entropy
bonus (the paper's DAPO setting), and no reference model is loaded.

Run it: `python -m mtp_occ.run [overrides]` (see README); `train(cfg, overrides)` is the API.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import torch

from mtp_occ import checkpoint
from mtp_occ.config import Config, plain_dict, require
from mtp_occ.data import PromptSampler, build_prompts
from mtp_occ.dist import DistInfo, broadcast_object, init_distributed, max_int, mean_metrics, shutdown
from mtp_occ.engine import build_engine
from mtp_occ.eval.policy import evaluate_policy
from mtp_occ.eval.runner import flat_metrics
from mtp_occ.eval.templates import get_template
from mtp_occ.log import RunLogger, read_run_json, update_run_json
from mtp_occ.policy import build_policy
from mtp_occ.preempt import Preempted, PreemptionGuard, slurm_job_id
from mtp_occ.provenance import environment, source_tree
from mtp_occ.regimes import build_regime
from mtp_occ.rl.grpo import dynamic_sampling_keep_G, group_advantages, overlong_penalty
from mtp_occ.rollout import build_rollout
from mtp_occ.rollout.hf import RolloutBatch, concat_batches
from mtp_occ.rollout.sampling import SamplingSettings
from mtp_occ.rundir import EvalDir, RunDir, timestamp
from mtp_occ.schedules import build_schedule
from mtp_occ.tasks import task_for
from mtp_occ.update import old_logprobs, rl_update

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


def prepare_run_dir(cfg: Config, overrides: list[str]) -> Path:
    """Create `<run_root>/<name>/` with overrides.txt, config.yaml and run.json (status running; the source
    tree and environment of this attempt, see `mtp_occ.provenance`)."""
    from omegaconf import OmegaConf

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).overrides.write_text("".join(f"{o}\n" for o in overrides))
    RunDir(run_dir).config.write_text(OmegaConf.to_yaml(plain_dict(cfg)))
    prev = read_run_json(run_dir)
    tree = source_tree()
    update_run_json(run_dir, name=cfg.name, host=socket.gethostname(), git_commit=tree.get("commit"), git=tree,
                    env=environment(),
                    start_time=prev.get("start_time") or timestamp(), end_time=None,
                    world_size=int(os.environ.get("WORLD_SIZE", 1)), slurm_job_id=slurm_job_id(),
                    status="running")
    return run_dir


def check_environment(cfg: Config) -> None:
    """Fail in milliseconds, before any model is built, on settings this machine cannot run (the checks
    that do not depend on the machine run at compose time, `Config._check_across_groups`)."""
    cuda = torch.cuda.is_available()
    if cfg.rollout.backend.value == "vllm":  # a CUDA GPU, or vLLM's CPU build (package metadata: nothing imported)
        from mtp_occ.rollout.vllm import vllm_config_problem

        key, problem = vllm_config_problem(cfg, cuda)
        require(problem is None, key, problem or "")
    require(cuda or cfg.device != "cuda", "device", "cuda, but CUDA is not available on this machine; valid here: cpu, auto")


def collect_rollouts(cfg: Config, model, tok, prompts, sampler: PromptSampler, step: int, d: DistInfo, backend):
    """Rollouts for `prompts_per_step` prompts, graded; with dynamic sampling, groups whose rewards are
    all equal are dropped and refilled from fresh prompts (up to `dynamic_sampling_max_batches` tries)."""
    from mtp_occ.rewards import grade, reward_metrics

    a, r, n = cfg.algo, cfg.rollout, cfg.algo.group_size  # n samples per prompt (G counts groups)
    template, sampling = get_template(cfg.data.template), SamplingSettings.for_rollouts(r)
    batches, rewards, scores, verdicts, answers, tried = [], [], [], [], [], 0
    kept = 0
    backend.prepare(model)
    for attempt in range(a.dynamic_sampling_max_batches if a.dynamic_sampling else 1):
        share = a.prompts_per_step // d.world  # every rank advances the sampler; each takes its block
        idx = sampler.next(a.prompts_per_step)[d.rank * share:(d.rank + 1) * share]
        items = [prompts[i] for i in idx]
        texts = [template.render(p.problem, tok) for p in items]
        batch = backend.generate(tok, texts, n, sampling, seed=step_seed(cfg.seed, step, attempt),
                                 add_special_tokens=template.add_special_tokens(tok),
                                 row_keys=(torch.tensor(idx).unsqueeze(1) * n + torch.arange(n)).reshape(-1),
                                 synced_gpus=cfg.deepspeed.enabled and cfg.deepspeed.stage == 3 and d.world > 1)
        gold = [p.answer for p in items for _ in range(n)]
        v = grade(batch.completions, gold, grader=cfg.reward.grader, timeout_s=cfg.reward.timeout_s,
                  extract=cfg.reward.extract, workers=cfg.reward.workers or None)
        score_B = torch.tensor([x.score for x in v])
        reward_B = score_B + overlong_penalty(batch.response_len_B, r.max_new_tokens, a.overlong_buffer,
                                              a.overlong_factor)
        tried += len(items)
        keep_G = dynamic_sampling_keep_G(reward_B, n) if a.dynamic_sampling else torch.ones(len(items), dtype=torch.bool)
        rows = (keep_G.nonzero().squeeze(1).unsqueeze(1) * n + torch.arange(n)).reshape(-1)
        rows = rows[: max(0, (a.prompts_per_step // d.world - kept) * n)]
        batches.append(batch.select(rows))
        rewards.append(reward_B[rows]), scores.append(score_B[rows])
        verdicts += [v[i] for i in rows.tolist()]
        answers += [gold[i] for i in rows.tolist()]
        kept += len(rows) // n
        if kept >= a.prompts_per_step // d.world:
            break
    backend.release()
    engine_metrics = backend.metrics()
    if kept == 0:
        return None, {"groups/kept_frac": 0.0}
    batch = concat_batches(batches)
    reward_B, score_B = torch.cat(rewards), torch.cat(scores)
    m = {"reward/mean": reward_B.mean().item(), "reward/std": reward_B.std().item() if len(reward_B) > 1 else 0.0,
         "reward/acc": score_B.mean().item(), "groups/kept_frac": kept / tried if tried else 0.0,
         "response/len_mean": batch.response_len_B.float().mean().item(),
         "response/truncated_frac": batch.truncated_B.float().mean().item(),
         "rollout/prompt_truncated": float(batch.prompt_truncated), **reward_metrics(verdicts), **engine_metrics}
    if cfg.reward.compare_with:
        from mtp_occ.rewards import disagreement

        other = grade(batch.completions, answers, grader=cfg.reward.compare_with, timeout_s=cfg.reward.timeout_s,
                      extract=cfg.reward.extract)
        m["reward/disagreement"] = disagreement(verdicts, other)
    if (task := task_for(cfg.data)) is not None:
        m.update(task.rollout_metrics(batch.completions))
    return (batch, reward_B), m


def engine_dir(cfg: Config, model, tok, base_dir: Path | None) -> str | None:
    """The HF directory a vLLM engine starts from (None for `rollout=hf`): the task's base, the GGUF file
    written out as an HF directory (cached), or `model.name_or_path`."""
    if cfg.rollout.backend.value != "vllm":
        return None
    if base_dir is not None:
        return str(base_dir)
    if cfg.model.gguf_file:
        from mtp_occ.dist import main_rank_first
        from mtp_occ.model.load import gguf_as_hf_dir

        with main_rank_first():  # rank 0 writes the directory (save_pretrained writes nothing on other ranks)
            return str(gguf_as_hf_dir(cfg.model, model.lm, tok))
    return cfg.model.name_or_path or None


def correct_rollout_mismatch(batch: RolloutBatch, old_BT: torch.Tensor, tis_cap: float) -> dict[str, float]:
    """vLLM rollouts: log the sampler-vs-trainer log-prob gap; with `tis_cap`, set truncated IS weights."""
    if batch.rollout_logprob_BT is None:
        return {}
    from mtp_occ.model.mtp import aligned_masks
    from mtp_occ.rollout.vllm import logprob_mismatch, tis_weights_BT

    loss_BT = aligned_masks(batch.attention_mask_BT, batch.response_mask_BT, 1)[0]
    rollout_BT = batch.rollout_logprob_BT.to(old_BT.device)
    if tis_cap > 0:
        batch.token_weight_BT = tis_weights_BT(old_BT, rollout_BT, tis_cap)
    return {"rollout/logprob_mismatch": logprob_mismatch(old_BT, rollout_BT, loss_BT)}


def evaluate_base(cfg: Config, model, tok, run_dir: Path, base_dir: Path | None, d: DistInfo, backend) -> dict:
    """The starting policy's evaluation (call it before loading a checkpoint): the run's own copy when it
    has one (a resumed run), else the base cache's when everything that decides its samples matches, else
    computed (by every rank together; rank 0 gets the summary, the others {}).

    The cache key is the eval settings plus the run's seed (the eval's sampling stream derives from it,
    `evaluate_policy`) and the intra-op thread count (which changes the bits): RL seeds share the base
    model, not its evaluation, so each seed's base score comes from its own sampling stream, as its final
    score does."""
    import hashlib

    own = RunDir(run_dir).base_eval.summary
    spec = plain_dict(cfg.eval) | {"seed": cfg.seed, "threads": torch.get_num_threads()}
    spec |= {"bf16": True} if cfg.deepspeed.enabled and cfg.deepspeed.bf16 else {}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    cached = EvalDir(base_dir / f"eval_{key}").summary if base_dir else None
    found = None
    if d.is_main:
        found = next((json.loads(f.read_text()) for f in (own, cached) if f is not None and f.exists()), None)
    if broadcast_object(found is not None):
        if d.is_main and not own.exists():
            own.parent.mkdir(parents=True, exist_ok=True)
            own.write_text(json.dumps(found, indent=1))
        return found or {}
    summary = evaluate_policy(cfg, model, tok, RunDir(run_dir).base_eval.root, None, d, backend)
    if cached is not None and d.is_main:
        cached.parent.mkdir(exist_ok=True)
        cached.write_text(json.dumps(summary, indent=1))
    return summary


def train(cfg: Config, overrides: list[str]) -> dict:
    """Train per `cfg`, evaluate, and return the final eval summary (plus timing)."""
    from tqdm.auto import tqdm

    check_environment(cfg)
    prompts = build_prompts(cfg.data, cfg.data.seed)  # bad data fails here, before a run dir or a model exists
    t_start, d = time.time(), init_distributed(cfg.device)
    if cfg.threads:  # before the run dir records the environment
        torch.set_num_threads(cfg.threads)
    run_dir = prepare_run_dir(cfg, overrides) if d.is_main else cfg.run_dir
    files = RunDir(run_dir)
    torch.manual_seed(cfg.seed)
    model, tok, base_dir = build_policy(cfg.model, cfg.data, cfg.model.pretrain.seed)  # one base for all RL seeds
    model_dir = engine_dir(cfg, model, tok, base_dir)  # before ZeRO-3 partitions the weights a GGUF export reads
    model.to(d.device)
    sampler = PromptSampler(len(prompts), cfg.seed, cfg.data.shuffle)
    regime, coef = build_regime(cfg.regime), build_schedule(cfg.coef_schedule)
    engine = build_engine(model, cfg.algo, cfg.deepspeed, total_steps=cfg.steps, world=d.world)
    backend = build_rollout(cfg.rollout, cfg.model, model, model_dir, cfg.seed)
    # the starting policy's score, before any checkpoint is loaded into the model (cached per base and seed)
    base_eval = evaluate_base(cfg, model, tok, run_dir, base_dir, d, backend) if cfg.eval.enabled else None
    ckpt_root, start, faults = files.checkpoints, 0, 0
    if (last := checkpoint.latest(ckpt_root)) is not None:
        st = checkpoint.load(last)
        engine.load_state_dict(st["engine"]), engine.load_shards(last)
        sampler.load_state_dict(st["sampler"]), regime.load_state_dict(st["regime"])
        start, faults = st["step"], st["faults"]
        log.info("resumed from %s (step %d)", last, start)
    wb = cfg.wandb
    logger = RunLogger(run_dir, config=plain_dict(cfg), name=cfg.name, mode=wb.mode.value, project=wb.project,
                       entity=wb.entity, group=wb.group or Path(cfg.run_root).resolve().name, tags=wb.tags,
                       resume_step=start if last is not None else None, rank=d.rank)
    bad_streak, summary, metrics = 0, None, {}
    bar = tqdm(range(start + 1, cfg.steps + 1), desc=f"RL {cfg.regime.name}", unit="step", initial=start,
               total=cfg.steps, mininterval=2.0, disable=not d.is_main)
    try:
        with PreemptionGuard() as guard:  # SIGUSR1/SIGUSR2/SIGTERM: finish the step, checkpoint, requeue
            for step in bar:
                t0 = time.perf_counter()
                rollouts, metrics = collect_rollouts(cfg, model, tok, prompts, sampler, step, d, backend)
                t1 = t2 = time.perf_counter()
                if not max_int(rollouts is None):  # dynamic sampling kept nothing somewhere: every rank skips
                    batch, reward_B = rollouts
                    adv_B = group_advantages(reward_B, cfg.algo.group_size, cfg.algo.norm_std, cfg.algo.adv_eps).to(d.device)
                    first_group = d.rank * (cfg.algo.prompts_per_step // d.world)  # this rank's block of groups
                    old_BT = old_logprobs(model, batch, cfg.algo, cfg.rollout.temperature, first_group,
                                          with_mtp=getattr(regime, "wants_old_mtp", False))
                    metrics.update(correct_rollout_mismatch(batch, old_BT, cfg.rollout.tis_cap))
                    t2 = time.perf_counter()
                    res = rl_update(model, engine, regime, batch, old_BT, adv_B, cfg.algo,
                                    coef_scale=coef((step - 1) / cfg.steps), temperature=cfg.rollout.temperature,
                                    group_size=cfg.algo.group_size, first_group=first_group,
                                    head_ce=cfg.regime.head_ce,
                                    diagnose=bool(cfg.diagnostics.every) and step % cfg.diagnostics.every == 0)
                    metrics.update(res.metrics)
                    logger.log_updates(res.per_update, step)  # diagnostics steps: one row per update
                    faults += res.skipped
                    bad_streak = bad_streak + 1 if res.skipped == cfg.algo.updates_per_step else 0
                    if bad_streak >= cfg.algo.max_bad_steps:
                        raise FloatingPointError(f"step {step}: {bad_streak} consecutive steps with every update skipped "
                                                 f"for a non-finite {res.bad_term} term; lower algo.lr or check the data")
                engine.scheduler_step()
                t3 = time.perf_counter()
                metrics = mean_metrics({**metrics, "lr": engine.lr(), "fault/skipped_total": float(faults),
                                        "time/rollout_s": t1 - t0, "time/old_logprob_s": t2 - t1,
                                        "time/update_s": t3 - t2, "time/step_s": t3 - t0})
                samples = None
                if cfg.eval.enabled and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                    summary = evaluate_policy(cfg, model, tok, files.eval.root, step, d, backend)  # every rank
                    if d.is_main:
                        metrics.update(flat_metrics(summary))
                        samples = files.eval.samples
                logger.log(metrics, step, samples_path=samples)
                stop = max_int(guard.requested)  # one signalled rank stops every rank after this step
                if stop or step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
                    checkpoint.save(ckpt_root, step, {"engine": engine.state_dict(), "sampler": sampler.state_dict(),
                                                      "regime": regime.state_dict(), "faults": faults},
                                    keep=cfg.keep_checkpoints, is_main=d.is_main, shards=engine.save_shards)
                if stop:
                    guard.exit_for_requeue(run_dir if d.is_main else None)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                lam=f"{metrics.get('mtp/lambda', 0.0):.3g}")
    except Preempted:  # checkpointed at this step; SLURM's requeue (or the same command) resumes
        logger.finish("preempted")
        backend.close()  # a vLLM engine tears down its process groups before ours go
        shutdown()
        raise
    except BaseException:  # a crash (or Ctrl-C) is recorded as such, in run.json and in wandb
        logger.finish("failed")
        if d.is_main:
            update_run_json(run_dir, end_time=timestamp(), status="failed")
        raise
    if summary is None and d.is_main and files.eval.summary.exists():  # re-run of a finished run
        summary = json.loads(files.eval.summary.read_text())
    logger.finish("finished")
    if d.is_main:
        update_run_json(run_dir, end_time=timestamp(), status="finished")
    backend.close()
    shutdown()
    return {"run_dir": str(run_dir), "base_eval": base_eval, "final_eval": summary, "last_metrics": metrics,
            "seconds": time.time() - t_start}
