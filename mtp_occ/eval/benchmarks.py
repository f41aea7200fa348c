"""The six math benchmarks, loaded from validated local jsonl files or from the Hugging Face hub.

What it is
    `load_benchmark(name)` returns a `Benchmark` (name + list of `Problem(id, problem, answer, source)`) for
    aime24 (30), aime25 (30), amc23 (40), math500 (500), minerva (272) or olympiadbench (675). Local files
    live in `default_data_dir()` = `<data_root>/benchmarks`: the copies shipped in `mtp_occ/assets/` unless
    `$MTP_OCC_DATA` points elsewhere (see `mtp_occ.assets`), one JSON object per line with
    `id, problem, answer[, solution], source` (`mtp_occ/assets/SOURCES.md` says where every row came from;
    a `.jsonl.gz` file is read as is). `load_jsonl(path)` validates every row and raises `BenchmarkDataError` naming the
    file, the 1-based line, the field and the fix; it never hands a half-valid file to the eval.

How it departs from the usual loaders
    - Local files first: the hub is opt-in (`hub=True`), because runs must not depend on network access and
      the local copies are pinned by SHA-256 in SOURCES.md.
    - Hub rows are mapped onto the same schema by `HUB_SPECS` (dataset id, split, fields, answer clean-up)
      and validated like a file. The hub copies are NOT guaranteed to match the local ones row for row:
      e.g. aime25's text and AMC answers are formatted differently; compare runs on one source only.

How to use
    >>> bench = load_benchmark("aime24", limit=3)  # local files
    >>> # load_benchmark(name, hub=True) needs `datasets` and hub access:
    >>> bench = load_benchmark("math500", hub=True)  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

BENCHMARK_NAMES = ("aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench")
REQUIRED_FIELDS = ("id", "problem", "answer")


class BenchmarkDataError(ValueError):
    """A benchmark file or hub dataset that does not fit the schema (the message says where and the fix)."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    source: str


@dataclass(frozen=True)
class Benchmark:
    name: str
    problems: list[Problem]

    def __len__(self) -> int:
        return len(self.problems)


def default_data_dir() -> Path:
    """`<data_root>/benchmarks`: the shipped copies, or `$MTP_OCC_DATA/benchmarks` when that is set."""
    from mtp_occ.assets import data_root

    return data_root() / "benchmarks"


# ------------------------------------------------------------------------------------------- local files


def _row_error(where: str, field: str, problem: str, fix: str) -> BenchmarkDataError:
    return BenchmarkDataError(f"{where}: field {field!r} {problem}. Fix: {fix}")


def _validate_row(row: object, where: str, default_source: str) -> Problem:
    if not isinstance(row, dict):
        raise BenchmarkDataError(f"{where}: expected a JSON object, got {type(row).__name__}. "
                                 'Fix: one object per line, e.g. {"id": ..., "problem": ..., "answer": ...}')
    for field in REQUIRED_FIELDS:
        value = row.get(field)
        if field not in row:
            raise _row_error(where, field, "is missing", f"add \"{field}\" to this row")
        if not isinstance(value, str):
            raise _row_error(where, field, f"must be a string, got {type(value).__name__} {value!r}",
                             f"write it as a JSON string, e.g. \"{field}\": \"{value}\"")
        if not value.strip():
            raise _row_error(where, field, "is empty", f"give this row a non-empty \"{field}\" or delete it")
    source = row.get("source") or default_source
    return Problem(id=row["id"], problem=row["problem"], answer=row["answer"].strip(), source=str(source))


def _check_unique(problems: Iterable[tuple[str, Problem]]) -> list[Problem]:
    seen: dict[str, str] = {}
    out = []
    for where, problem in problems:
        if problem.id in seen:
            raise _row_error(where, "id", f"{problem.id!r} repeats {seen[problem.id]}",
                             "ids must be unique within a benchmark; rename or drop the duplicate")
        seen[problem.id] = where
        out.append(problem)
    return out


def load_jsonl(path: str | os.PathLike) -> list[Problem]:
    """Every row of a jsonl file (gzip-compressed if it ends in `.gz`), validated (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found. Fix: unset MTP_OCC_DATA to use the data shipped "
                                "in mtp_occ/assets, set it to a dir holding benchmarks/<name>.jsonl and "
                                "train/, pass data_dir=..., or load from the hub (hub=True)")
    rows = []
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BenchmarkDataError(f"{where}: not valid UTF-8 ({e}). "
                                         "Fix: re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkDataError(f"{where}: malformed JSON ({e.msg} at column {e.colno}). "
                                         "Fix: one complete JSON object per line") from None
            rows.append((where, _validate_row(row, where, default_source=Path(path.name.removesuffix('.gz')).stem)))
    if not rows:
        raise BenchmarkDataError(f"{path}: no rows. Fix: one JSON object per line")
    return _check_unique(rows)


# ------------------------------------------------------------------------------------------------- hub


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _integral_float(value: object) -> str:
    """AMC answers are stored as floats (27.0); write integral ones as integers, as the local file does."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return _as_text(value)


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _olympiad_final_answer(value: object) -> str:
    """`final_answer` is a list of `$...$` strings; join and drop the math delimiters (as the local file)."""
    parts = value if isinstance(value, list) else [value]
    return ", ".join(_UNESCAPED_DOLLAR.sub("", _as_text(p)).strip() for p in parts)


@dataclass(frozen=True)
class HubSpec:
    dataset_id: str
    split: str
    problem_field: str
    answer_field: str
    id_field: str | None  # None: the row index
    config: str | None = None
    answer_fn: Callable[[object], str] = _as_text
    note: str = ""  # how the fields were checked (no network here: documentation and code only)


HUB_SPECS: dict[str, HubSpec] = {
    "aime24": HubSpec("HuggingFaceH4/aime_2024", "train", "problem", "answer", "id",
                      note="dataset card checked: id int64, problem, solution, answer str, url, year"),
    "aime25": HubSpec("math-ai/aime25", "test", "problem", "answer", None,
                      note="fields seen in third-party loaders (problem, answer), card not seen; ids = row "
                           "index, so they do NOT match the local file's aime25-90..119"),
    "amc23": HubSpec("math-ai/amc23", "test", "question", "answer", "id", answer_fn=_integral_float,
                     note="fields seen in third-party loaders (id, question, float answer), card not seen"),
    "math500": HubSpec("HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id",
                       note="dataset card (and mirrors') checked: problem, solution, answer, subject, "
                            "level, unique_id"),
    "minerva": HubSpec("math-ai/minervamath", "test", "question", "answer", None,
                       note="fields seen in third-party loaders (question, answer), card not seen"),
    "olympiadbench": HubSpec("math-ai/olympiadbench", "test", "question", "final_answer", "id",
                             answer_fn=_olympiad_final_answer,
                             note="fields seen in third-party loaders (id, question, final_answer list)"),
}


def _load_hub(name: str, spec: HubSpec) -> list[Problem]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("hub=True needs the `datasets` package (pip install datasets)") from e
    try:
        rows = datasets.load_dataset(spec.dataset_id, spec.config, split=spec.split)
    except Exception as e:  # network, auth, renamed splits: one readable line instead of a deep traceback
        raise BenchmarkDataError(
            f"hub dataset {spec.dataset_id} (split {spec.split!r}) for benchmark {name!r} could not be "
            f"loaded: {type(e).__name__}: {e}. Fix: check network / HF_TOKEN, or use the local files "
            "(hub=False)") from None
    problems = []
    for index, row in enumerate(rows):
        where = f"hub:{spec.dataset_id}[{spec.split}] row {index + 1}"
        missing = [f for f in (spec.problem_field, spec.answer_field, spec.id_field) if f and f not in row]
        if missing:
            raise BenchmarkDataError(f"{where}: fields {missing} missing (has {sorted(row)}). Fix: update "
                                     f"HUB_SPECS[{name!r}] in {__file__} to the dataset's current schema")
        raw_id = row[spec.id_field] if spec.id_field else index
        mapped = {"id": f"{name}-{raw_id}", "problem": row[spec.problem_field],
                  "answer": spec.answer_fn(row[spec.answer_field]), "source": name}
        problems.append((where, _validate_row(mapped, where, default_source=name)))
    return _check_unique(problems)


# ----------------------------------------------------------------------------------------------- entry


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None, hub: bool = False,
                   limit: int | None = None) -> Benchmark:
    """Benchmark `name` from `<data_dir>/<name>.jsonl` (default `default_data_dir()`) or the hub;
    `limit` keeps the first N problems in file order."""
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARK_NAMES)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    if hub:
        problems = _load_hub(name, HUB_SPECS[name])
    else:
        from mtp_occ.assets import data_file

        local = Path(data_dir) / f"{name}.jsonl" if data_dir else data_file(f"benchmarks/{name}.jsonl")
        problems = load_jsonl(local)
    return Benchmark(name, problems[:limit] if limit else problems)
