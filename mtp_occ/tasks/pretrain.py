"""MTP pre-training of the embedded task's base model, cached so a sweep pays for it once.

next-token CE + `mtp_weight` × mean-over-depths MTP CE on worked solutions (prompt tokens are not
supervised: they are random numbers). The result is written with `save_model` (HF dir + MiMo-layout MTP
weights + tokenizer) under `<cache>/bases/<key>/`, where the key hashes everything that determines the
weights (model shape, task, pre-training config, seed, format version, and the numerics: torch and
transformers versions and the CPU kernel family, see `mtp_occ.provenance`). Pre-training runs on
`model.pretrain.threads` intra-op threads whatever the run's own `threads`, because the thread count changes
the base's bits: one config gives one base on every machine and in every job of a sweep. Jobs that start
together wait on a file lock instead of pre-training the same base several times; a crash mid-way leaves no
partial base (written to a temp dir, renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from mtp_occ.config import DataConfig, LrSchedule, ModelConfig, plain_dict
from mtp_occ.tasks.arith import ArithTask, build_tokenizer

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
STATS_FILE = "pretrain.json"  # a base's training stats; a cached base dir that has it is complete


def base_key(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> str:
    """Hash of everything that determines the base's weights, the numerics included (`numerics_key`: a
    cache shared across machines or library upgrades never hands out a base computed differently)."""
    from mtp_occ.provenance import numerics_key

    spec = {"v": FORMAT_VERSION, "model": plain_dict(model_cfg), "seed": seed, "numerics": numerics_key(),
            "task": {k: getattr(data_cfg, k) for k in ("n_terms", "min_operand", "max_operand", "heldout_size", "seed")}}
    spec["model"]["pretrain"].pop("cache_dir", None)
    spec["model"].pop("name", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _batch(task: ArithTask, tok, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `<s> prompt solution </s>` with the response mask on `solution </s>`."""
    rows, resp = [], []
    for i in range(start, start + size):
        p = task.train_problem(i, stream="pretrain")
        prompt_ids = tok(p.prompt)["input_ids"]
        sol_ids = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt_ids + sol_ids)
        resp.append([0] * len(prompt_ids) + [1] * len(sol_ids))
    T = max(map(len, rows))
    ids = torch.full((size, T), tok.pad_token_id)
    attn, mask = torch.zeros(size, T, dtype=torch.long), torch.zeros(size, T, dtype=torch.long)
    for b, (r, m) in enumerate(zip(rows, resp, strict=True)):
        ids[b, : len(r)], attn[b, : len(r)], mask[b, : len(m)] = torch.tensor(r), 1, torch.tensor(m)
    return ids, attn, mask


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch (and its BLAS) on `n` intra-op threads inside the block, the caller's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, out_dir: Path) -> dict:
    """Train a tiny MTP model from scratch (init from `seed`) on the task (problems from `data_cfg.seed`)
    and save it to `out_dir`, on `model_cfg.pretrain.threads` threads; returns stats."""
    with intra_op_threads(model_cfg.pretrain.threads):
        return _pretrain(model_cfg, data_cfg, seed, out_dir)


def _pretrain(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int, out_dir: Path) -> dict:
    from tqdm.auto import tqdm

    from mtp_occ.model.load import build_tiny, save_model
    from mtp_occ.schedules import build_lr_schedule

    pc = model_cfg.pretrain
    task = ArithTask(data_cfg.n_terms, data_cfg.min_operand, data_cfg.max_operand, data_cfg.heldout_size,
                     data_cfg.seed)
    tok = build_tokenizer()
    model = build_tiny(model_cfg, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=pc.lr, weight_decay=0.0)

    # the RL engine's cosine (`schedules.lr_cosine`), whose clamp min(p, 1) changes nothing here: LambdaLR
    # evaluates steps 0..pc.steps (the last after the final update, unused), and p <= 1 on all of them
    # (p = 1 exactly at step pc.steps when pc.steps > warmup_steps; the warm-up branch or p = 0 otherwise)
    lr_at = build_lr_schedule(LrSchedule.cosine, pc.warmup_steps, pc.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0, bar = time.time(), tqdm(range(pc.steps), desc="pre-train MTP base", unit="step", mininterval=2.0)
    for step in bar:
        ids, attn, resp = _batch(task, tok, step * pc.batch_size, pc.batch_size)
        out = model(ids, attn, resp)
        m = out.loss_mask_BT.float()
        ce_main = -(out.logprob_BT * m).sum() / m.sum()
        loss = ce_main + pc.mtp_weight * out.mtp_ce_K.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == pc.steps - 1:
            bar.set_postfix(ce=f"{ce_main.item():.3f}", mtp_ce=f"{out.mtp_ce_K.mean().item():.3f}")
    stats = {"steps": pc.steps, "final_ce": ce_main.item(), "final_mtp_ce": out.mtp_ce_K.mean().item(),
             "seconds": time.time() - t0}
    save_model(model, out_dir, tokenizer=tok)
    (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=1))
    return stats


def cached_base(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> Path:
    """The pre-trained base dir for this config, pre-training it (once, under a file lock) if needed."""
    from filelock import FileLock

    root = model_cfg.pretrain.resolved_cache_dir() / "bases"
    root.mkdir(parents=True, exist_ok=True)
    key = base_key(model_cfg, data_cfg, seed)
    final = root / key
    with FileLock(str(root / f"{key}.lock")):
        if (final / STATS_FILE).exists():
            log.info("using cached base model %s", final)
            return final
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        log.info("pre-training the base model into %s", final)
        pretrain(model_cfg, data_cfg, seed, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final
