"""The policy a run starts from: (model, tokenizer, base dir) for a model config and a data config.

A hub or local model (`model.source=hf|mimo`) loads with its own tokenizer. A tiny model
(`model.source=tiny`) takes the task's tokenizer (`data.source` must name a task, checked at compose
time) and, with `model.pretrain.steps > 0`, the task's cached MTP-pre-trained base (`Task.base`); with 0
steps it is a random-init model. Kept apart from `mtp_occ.model.load`, which loads and saves models and
knows nothing of tasks, so that the task code (which builds and saves models) and the model code do not
import each other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtp_occ.config import DataConfig, ModelConfig, ModelSource
from mtp_occ.model.load import build_tiny, load_pretrained, load_tokenizer
from mtp_occ.model.mtp import MTPModel


def build_policy(model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> tuple[MTPModel, object, Path | None]:
    """(model, tokenizer, base_dir); `seed` initialises a tiny model (and keys its pre-trained base)."""
    if model_cfg.source is not ModelSource.tiny:
        return load_pretrained(model_cfg), load_tokenizer(model_cfg.name_or_path, model_cfg.gguf_file), None
    from mtp_occ.tasks import TASKS

    task = TASKS[data_cfg.source]  # a task, by `Config`'s compose-time check
    if model_cfg.pretrain.steps > 0:
        from mtp_occ.dist import main_rank_first

        with main_rank_first():  # one rank pre-trains (and writes) the base, the others read it
            base = task.base(model_cfg, data_cfg, seed)
        loaded = dataclasses.replace(model_cfg, source=ModelSource.hf, name_or_path=str(base))
        return load_pretrained(loaded), load_tokenizer(str(base)), base
    tok = task.tokenizer()
    return build_tiny(model_cfg, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, seed), tok, None
