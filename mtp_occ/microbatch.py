"""Micro-batches of a mini-batch: which rows run together in one forward/backward, and that forward.

Two ways to cut a mini-batch (the loss normalisers stay the mini-batch's either way, `mtp_occ.update`):
- `algo.micro_batch_size` rows at a time, in rollout order, at the rollout batch's full width (the default);
- a token budget, `algo.max_tokens_per_micro_batch` (verl's dynamic batch size): rows sorted by real length,
  longest first, filled in that order (next-fit decreasing) while the micro-batch's cost stays within the
  budget; its columns are then trimmed to the rows' real extent. Cost = rows × that trimmed width for padded
  micro-batches, the sum of real lengths when packed (`algo.pack_sequences`). Sorting groups similar
  lengths, which is what cuts the padding. verl (`rearrange_micro_batches`) instead fixes the number of
  micro-batches to ⌈Σ len / budget⌉ and balances them with Karmarkar–Karp, which evens out their sizes but
  can exceed the budget; here no micro-batch ever exceeds it (a row longer than the budget is an error
  that names the key), at the price of an occasional extra micro-batch.

`forward` runs the model on one micro-batch, packed into one row when `algo.pack_sequences` (see
`mtp_occ.model.packing`), and returns its outputs in the micro-batch's padded layout, so every loss reads
them as if nothing had been packed.
"""

from __future__ import annotations

import dataclasses

import torch

from mtp_occ.config import AlgoConfig, ConfigError
from mtp_occ.model.mtp import ALL_PATHS, MTPModel, MTPOutput
from mtp_occ.model.packing import PACKING_ATTENTION, pack_rows, unpack_rows
from mtp_occ.rollout.hf import RolloutBatch


def token_budget_rows(attention_mask_BT: torch.Tensor, budget: int, packed: bool, max_rows: int = 0
                      ) -> list[torch.Tensor]:
    """Row indices of each micro-batch under a token budget (see the module docstring); `max_rows` caps the
    rows per micro-batch (0 = no cap). A padded micro-batch costs rows × its trimmed width (from the first
    real column of any row to the last), a packed one the sum of its real lengths. Deterministic: ties keep
    row order."""
    real_BT = attention_mask_BT.bool()
    T = real_BT.shape[1]
    first_B = torch.where(real_BT.any(1), real_BT.long().argmax(1), 0)
    last_B = T - 1 - real_BT.flip(1).long().argmax(1)
    len_B = real_BT.sum(1)
    if len(len_B) and int(len_B.max()) > budget:
        raise ConfigError(f"config key `algo.max_tokens_per_micro_batch`: {budget} is below a sequence of "
                          f"{int(len_B.max())} tokens; set it to at least rollout.max_prompt_len + rollout.max_new_tokens")
    parts: list[list[int]] = []
    cur: list[int] = []
    lo = hi = total = 0
    for i in torch.argsort(len_B, descending=True, stable=True).tolist():
        f, e, n = int(first_B[i]), int(last_B[i]), int(len_B[i])
        if cur:
            lo2, hi2, total2 = min(lo, f), max(hi, e), total + n
            cost = total2 if packed else (len(cur) + 1) * (hi2 - lo2 + 1)
            if cost <= budget and not (max_rows and len(cur) >= max_rows):
                cur, lo, hi, total = cur + [i], lo2, hi2, total2
                continue
            parts.append(cur)
        cur, lo, hi, total = [i], f, e, n
    return [torch.tensor(c) for c in parts + ([cur] if cur else [])]


def micro_batch_rows(batch: RolloutBatch, algo: AlgoConfig) -> list[torch.Tensor]:
    """Row indices (into `batch`) of each micro-batch: by token budget when one is set, else
    `micro_batch_size` consecutive rows (0 = all rows at once). An empty batch has no micro-batches (a
    rank whose share of a mini-batch is empty; the caller keeps the collectives in step)."""
    if len(batch) == 0:
        return []
    if algo.max_tokens_per_micro_batch:
        return token_budget_rows(batch.attention_mask_BT, algo.max_tokens_per_micro_batch, algo.pack_sequences,
                                 algo.micro_batch_size)
    step = algo.micro_batch_size or len(batch)
    return [torch.arange(s, min(s + step, len(batch))) for s in range(0, len(batch), step)]


def cut(batch: RolloutBatch, rows: torch.Tensor, trim: bool) -> tuple[RolloutBatch, slice]:
    """(`batch`'s rows `rows`, the column slice kept): with `trim`, only the columns where some row is real."""
    part = batch.select(rows)
    if not trim:
        return part, slice(None)
    real_T = part.attention_mask_BT.bool().any(0).nonzero().squeeze(1)
    cols = slice(int(real_T[0]), int(real_T[-1]) + 1) if len(real_T) else slice(0, 1)
    sliced = {f.name: getattr(part, f.name)[:, cols] for f in dataclasses.fields(part)
              if f.name.endswith("_BT") and getattr(part, f.name) is not None}
    return dataclasses.replace(part, **sliced), cols


def check_packing(model: MTPModel, algo: AlgoConfig) -> None:
    impl = getattr(model.lm.config, "_attn_implementation", None)
    if algo.pack_sequences and impl not in PACKING_ATTENTION:
        raise ConfigError(f"config key `algo.pack_sequences`: needs model.attn_implementation in {PACKING_ATTENTION} "
                          f"(they separate packed sequences by position ids), got {impl!r}; set "
                          "algo.pack_sequences=false or change model.attn_implementation")


def forward(model: MTPModel, part: RolloutBatch, algo: AlgoConfig, temperature: float, grad_path=ALL_PATHS,
            with_mtp: bool = True, head_ce: bool = False) -> MTPOutput:
    """The model on one micro-batch (packed when `algo.pack_sequences`), outputs in `part`'s padded layout."""
    kw = {"grad_path": grad_path, "temperature": temperature, "with_mtp": with_mtp,
          "logprob_chunk_mb": algo.logprob_chunk_mb, "head_ce": head_ce}
    if not algo.pack_sequences:
        return model(part.input_ids_BT, part.attention_mask_BT, part.response_mask_BT, **kw)
    attn_BT = part.attention_mask_BT
    ids_1N, resp_1N, pos_1N = pack_rows(attn_BT, part.input_ids_BT, part.response_mask_BT)
    out = model(ids_1N, torch.ones_like(ids_1N), resp_1N, position_ids_BT=pos_1N, **kw)

    def unpack_K(x_K1N: torch.Tensor) -> torch.Tensor:
        return torch.stack([unpack_rows(x[None], attn_BT) for x in x_K1N]) if len(x_K1N) else \
            x_K1N.new_zeros((0, *attn_BT.shape))

    def unpack_opt(x_K1N: torch.Tensor | None) -> torch.Tensor | None:
        return None if x_K1N is None else unpack_K(x_K1N[:, 0])

    return MTPOutput(unpack_rows(out.logprob_BT, attn_BT), unpack_K(out.mtp_logprob_KBT[:, 0]),
                     unpack_rows(out.loss_mask_BT, attn_BT), unpack_K(out.mtp_ce_mask_KBT[:, 0]),
                     unpack_K(out.mtp_rl_mask_KBT[:, 0]), out.mtp_ce_K, unpack_opt(out.mtp_hit_KBT),
                     unpack_opt(out.mtp_head_logprob_KBT))
