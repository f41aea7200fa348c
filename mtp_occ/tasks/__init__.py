"""Tasks: a training-prompt source that brings its own evaluation set, rollout metrics and, for
`model=tiny`, its tokenizer and pre-trained base. The embedded `arith` task is one (`mtp_occ.tasks.arith`).

    data.source=<task>          training prompts from the task (`Task.prompts`)
    eval.benchmarks=[<task>]    its held-out set (`Task.heldout`), graded like the math benchmarks
    model=tiny                  its tokenizer (`Task.tokenizer`) and its cached MTP-pre-trained base
                                (`Task.base`, when `model.pretrain.steps > 0`)

Nothing outside this package names a task: callers look one up with `task_for(data_cfg)` (None for the
file and hub sources, `data.source=jsonl|hub`) or `TASKS[name]`. A new task is one new module here that
calls `register_task(...)`; every module of the package is imported with it (`_discover`), so the
config checks (`data.source`, `eval.benchmarks`) accept its name at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mtp_occ.config import DataConfig, ModelConfig
    from mtp_occ.data import Prompt

FILE_SOURCES = ("jsonl", "hub")  # `data.source` values that are not tasks


class PromptSource(Protocol):
    """Indexable training prompts (an unbounded task stream reports a huge length)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Prompt: ...


class Task(Protocol):
    name: str

    def prompts(self, data: DataConfig, seed: int) -> PromptSource:
        """The training stream for this data config (`seed`: the task's problem seed)."""
        ...

    def heldout(self, data: DataConfig) -> list[Prompt]:
        """The evaluation set, disjoint from the training stream."""
        ...

    def rollout_metrics(self, completions: list[str]) -> dict[str, float]:
        """Task-specific metrics of one step's rollouts (logged beside the rewards)."""
        ...

    def tokenizer(self, out_dir: Path | None = None):
        """The tokenizer a `model=tiny` policy uses on this task (saved to `out_dir` when given)."""
        ...

    def base(self, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> Path:
        """The cached pre-trained base model dir for `model=tiny` (pre-trained on first use)."""
        ...


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS or task.name in FILE_SOURCES:
        raise ValueError(f"task {task.name!r} registered twice or shadows a data source")
    TASKS[task.name] = task
    return task


def task_for(data_cfg: DataConfig) -> Task | None:
    """The task behind `data.source`, or None for the file and hub sources."""
    return TASKS.get(data_cfg.source)


def _discover() -> None:
    import importlib
    import pkgutil

    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{mod.name}")


_discover()

__all__ = ["FILE_SOURCES", "TASKS", "PromptSource", "Task", "register_task", "task_for"]
