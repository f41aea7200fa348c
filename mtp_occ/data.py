"""Training prompts (a registered task's stream, a local jsonl, or a hub dataset) and a resumable sampler.

Every source yields `Prompt(id, problem, answer)`; the prompt template is applied by the caller.
Local files go through the same validation as the benchmarks (`mtp_occ.eval.benchmarks.load_jsonl`):
a bad row fails with file, line and field. The sampler walks seeded per-epoch permutations and its state
is two integers, so a resumed run draws exactly the prompts the uninterrupted run would have drawn.

Hub datasets (`data=hub data.hub_id=...`) are mapped from the common layouts: `problem`/`question`/`prompt`
(a string or a chat list, whose last user message is taken) and `answer`/`solution`-free ground truth in
`answer` or `reward_model.ground_truth` (verl / DAPO-Math-17k).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mtp_occ.config import DataConfig, require


@dataclass(frozen=True)
class Prompt:
    id: str
    problem: str
    answer: str


class ListPrompts:
    def __init__(self, prompts: list[Prompt]):
        if not prompts:
            raise ValueError("the training prompt set is empty")
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]


def _hub_row(row: dict, i: int, hub_id: str) -> Prompt:
    problem = row.get("problem") or row.get("question") or row.get("prompt")
    if isinstance(problem, list):  # chat format: the last user message
        problem = [m["content"] for m in problem if m.get("role") == "user"][-1]
    answer = row.get("answer")
    if answer is None and isinstance(row.get("reward_model"), dict):
        answer = row["reward_model"].get("ground_truth")
    if not isinstance(problem, str) or not problem.strip() or answer is None:
        raise ValueError(f"{hub_id} row {i}: needs a non-empty problem/question/prompt and an answer "
                         f"(or reward_model.ground_truth); got keys {sorted(row)}")
    return Prompt(str(row.get("id", f"{hub_id}-{i}")), problem, str(answer))


def build_prompts(cfg: DataConfig, seed: int):
    """The training prompts (`mtp_occ.tasks.PromptSource`); `seed` seeds a task's problems."""
    from mtp_occ.tasks import task_for

    if (task := task_for(cfg)) is not None:
        return task.prompts(cfg, seed)
    if cfg.source == "jsonl":
        from mtp_occ.eval.benchmarks import load_jsonl

        path = Path(cfg.path)
        require(path.is_file(), "data.path", f"{path} is not a file (set data.path; data=dapo_math_17k reads the shipped copy unless MTP_OCC_DATA is set)")
        return ListPrompts([Prompt(p.id, p.problem, p.answer) for p in load_jsonl(path)])
    import datasets

    ds = datasets.load_dataset(cfg.hub_id, split=cfg.split)
    return ListPrompts([_hub_row(dict(r), i, cfg.hub_id) for i, r in enumerate(ds)])


class PromptSampler:
    """Seeded epoch permutations (or the natural order for unbounded sources); state = (epoch, pos)."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle and n < 2**31
        self.epoch, self.pos = 0, 0
        self._perm: torch.Tensor | None = None

    def _order(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g)
        return self._perm

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order()
            out.append(int(order[self.pos]) if order is not None else self.pos)
            self.pos += 1
            if self.pos == self.n:
                self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._perm = state["epoch"], state["pos"], None
