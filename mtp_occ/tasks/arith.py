"""The embedded verifiable task: left-to-right chains of +/− over two-digit numbers, with worked steps.

    prompt   "49+97-53="
    solution "49+97=146;146-53=93;\\boxed{93}"        (then </s>)

It needs no download, leaves RL something to learn on 2 CPU cores (a tiny model pre-trained for ~1.5 min
reaches ~35% at T=1; single-digit chains saturate and leave nothing), and its answers are graded like the
math benchmarks: the last \\boxed{} against the integer answer. Outcome rewards also credit a right answer
reached through a wrong step; `step_accuracy` measures that.

Problems are a pure function of (seed, index), so the training stream needs no storage and resumes from
an index; the held-out set uses its own seed and is excluded from the training stream.

The tokenizer is character level (26 ids), built with `tokenizers` and saved in HF format so the exact
same HF code path (tokenize, `generate`, decode) runs as for hub models.

Registered as the task `arith` (`Arith`, see `mtp_occ.tasks`): `data=arith` trains on its stream,
`eval.benchmarks=[arith]` evaluates on its held-out set, rollouts log `arith/step_acc`, and `model=tiny`
uses its tokenizer and its pre-trained base (`mtp_occ.tasks.pretrain`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtp_occ.tasks import register_task

if TYPE_CHECKING:
    from mtp_occ.config import DataConfig, ModelConfig
    from mtp_occ.data import Prompt

CHARS = list("0123456789+-=;") + ["\\", "b", "o", "x", "e", "d", "{", "}"]
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
HELDOUT_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class ArithProblem:
    id: str
    prompt: str
    solution: str
    answer: str


def make_problem(rng: random.Random, n_terms: int, lo: int, hi: int, pid: str) -> ArithProblem:
    nums = [rng.randint(lo, hi) for _ in range(n_terms)]
    ops = [rng.choice("+-") for _ in range(n_terms - 1)]
    prompt = str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:], strict=True)) + "="
    acc, steps = nums[0], []
    for o, n in zip(ops, nums[1:], strict=True):
        new = acc + n if o == "+" else acc - n
        steps.append(f"{acc}{o}{n}={new}")
        acc = new
    return ArithProblem(pid, prompt, ";".join(steps) + f";\\boxed{{{acc}}}", str(acc))


class ArithTask:
    """Training stream and held-out set of the chain task for one data config."""

    def __init__(self, n_terms: int = 3, min_operand: int = 10, max_operand: int = 99,
                 heldout_size: int = 1000, seed: int = 0):
        self.n_terms, self.lo, self.hi, self.seed = n_terms, min_operand, max_operand, seed
        rng = random.Random(seed + HELDOUT_SEED_OFFSET)
        self.heldout = [make_problem(rng, n_terms, self.lo, self.hi, f"arith-heldout-{i}")
                        for i in range(heldout_size)]
        self._heldout_prompts = {p.prompt for p in self.heldout}

    def train_problem(self, index: int, stream: str = "rl") -> ArithProblem:
        """The index-th problem of a training stream ("rl" prompts, "pretrain" worked solutions);
        held-out prompts are skipped deterministically."""
        for attempt in range(100):
            rng = random.Random(f"{stream}:{self.seed}:{index}:{attempt}")
            p = make_problem(rng, self.n_terms, self.lo, self.hi, f"arith-{stream}-{index}")
            if p.prompt not in self._heldout_prompts:
                return p
        raise RuntimeError("operand range too small: the training stream cannot avoid the held-out set")


def step_accuracy(completion: str) -> float:
    """Fraction of the worked steps `a±b=c` in `completion` that are arithmetically right (1.0 if none)."""
    steps = re.findall(r"(-?\d+)([+-])(\d+)=(-?\d+)", completion)
    if not steps:
        return 1.0
    ok = sum((int(a) + int(b) if o == "+" else int(a) - int(b)) == int(c) for a, o, b, c in steps)
    return ok / len(steps)


def build_tokenizer(out_dir: Path | None = None):
    """A character-level `PreTrainedTokenizerFast` (saved to `out_dir` when given)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=PAD, padding_side="left")
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


class ArithStream:
    """The training stream: unbounded, generated on demand from (seed, index)."""

    def __init__(self, task: ArithTask):
        self.task = task

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> Prompt:
        from mtp_occ.data import Prompt

        p = self.task.train_problem(i)
        return Prompt(p.id, p.prompt, p.answer)


class Arith:
    """The `arith` task (`mtp_occ.tasks.Task`)."""

    name = "arith"

    @staticmethod
    def problems(data: DataConfig) -> ArithTask:
        return ArithTask(data.n_terms, data.min_operand, data.max_operand, data.heldout_size, data.seed)

    def prompts(self, data: DataConfig, seed: int) -> ArithStream:
        return ArithStream(ArithTask(data.n_terms, data.min_operand, data.max_operand, data.heldout_size, seed))

    def heldout(self, data: DataConfig) -> list[Prompt]:
        from mtp_occ.data import Prompt

        return [Prompt(p.id, p.prompt, p.answer) for p in self.problems(data).heldout]

    def rollout_metrics(self, completions: list[str]) -> dict[str, float]:
        return {"arith/step_acc": sum(step_accuracy(c) for c in completions) / len(completions)}

    def tokenizer(self, out_dir: Path | None = None):
        return build_tokenizer(out_dir)

    def base(self, model_cfg: ModelConfig, data_cfg: DataConfig, seed: int) -> Path:
        from mtp_occ.tasks.pretrain import cached_base

        return cached_base(model_cfg, data_cfg, seed)


register_task(Arith())
