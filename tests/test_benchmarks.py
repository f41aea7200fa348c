"""Benchmark loading: the six local files, row validation with useful errors, the hub mapping (offline,
`datasets.load_dataset` faked), and the gold check: every ground-truth answer, fed back as `\\boxed{answer}`,
must grade correct with the math_verify grader.

The check passes with no row edited. Rows that needed (or still need) special handling:
  - 62 Minerva answers in e-notation (minerva-1 "4.5e33", minerva-60 "4.4e7", ...): LaTeX parsing reads
    "4.5e33" as 4.5*e*33, so the math_verify grader rewrites plain e-notation to 4.5\\times10^{33} on both
    sides (then "4.5 \\times 10^{33}" from a model also matches).
  - Percentages olympiadbench-2255 "62.5%", -2276 "8 \\%", -2341 "17.5%": a boxed percent does not parse;
    the grader compares the bare number. minerva-38 "-1./3", minerva-49 "-3./2": "1./3" becomes "1/3".
  - Gradable only by an exact copy (the gold parses to a string, not to sympy): minerva-5
    "np.arcsin(10/13)", minerva-27 (an ODE with \\odot units), minerva-269 "E_{1},E_{2}",
    olympiadbench-1782 "m_{\\max }=n^{2}-n-1", olympiadbench-2045 "t(0,4]". Left as they are: 5 of 1,547.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest

import mtp_occ
from mtp_occ.eval.benchmarks import (
    BENCHMARK_NAMES,
    HUB_SPECS,
    BenchmarkDataError,
    default_data_dir,
    load_benchmark,
    load_jsonl,
)
from mtp_occ.rewards import GradingPool

EXPECTED_ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272,
                 "olympiadbench": 675}


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MTP_OCC_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path / "benchmarks"
    monkeypatch.delenv("MTP_OCC_DATA")
    assert default_data_dir() == Path(mtp_occ.__file__).parent / "assets" / "benchmarks"


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_local_benchmarks_load(name):
    bench = load_benchmark(name)
    assert bench.name == name and len(bench) == EXPECTED_ROWS[name]
    assert all(p.source == name and p.id.startswith(f"{name}-") and p.answer for p in bench.problems)
    limited = load_benchmark(name, limit=3)
    assert limited.problems == bench.problems[:3]


def test_unknown_benchmark_lists_valid_names():
    with pytest.raises(ValueError, match="unknown benchmark 'aime26'; valid: aime24, aime25, amc23, math500"):
        load_benchmark("aime26")


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="MTP_OCC_DATA"):
        load_benchmark("aime24", data_dir=tmp_path)


GOOD = '{"id": "a-1", "problem": "1+1?", "answer": "2", "source": "a"}'


@pytest.mark.parametrize("bad_line, field, message", [
    ('{"id": "a-2", "problem": "x", "answer": ', None, "malformed JSON"),
    ('{"id": "a-2", "problem": "x"}', "answer", "is missing"),
    ('{"id": "a-2", "problem": "   ", "answer": "3"}', "problem", "is empty"),
    ('{"id": "a-2", "problem": "x", "answer": 3}', "answer", "must be a string, got int 3"),
    ('{"id": "", "problem": "x", "answer": "3"}', "id", "is empty"),
    ('{"id": "a-1", "problem": "x", "answer": "3"}', "id", "'a-1' repeats"),
    ('["a-2", "x", "3"]', None, "expected a JSON object"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, bad_line, field, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(GOOD + "\n\n" + bad_line + "\n")  # the blank line 2 is skipped; the bad row is line 3
    with pytest.raises(BenchmarkDataError) as err:
        load_jsonl(path)
    text = str(err.value)
    assert f"{path}:3" in text and message in text and "Fix:" in text
    if field:
        assert f"field {field!r}" in text
    assert isinstance(err.value, ValueError)


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "latin.jsonl"
    latin = '{"id": "b", "problem": "caf\xe9", "answer": "1"}'.encode("latin-1")
    path.write_bytes(GOOD.encode() + b"\n" + latin)
    with pytest.raises(BenchmarkDataError, match=r"latin.jsonl:2: not valid UTF-8"):
        load_jsonl(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(BenchmarkDataError, match="no rows"):
        load_jsonl(empty)


def test_source_defaults_to_file_stem(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "1", "problem": "p", "answer": " 4 "}\n')
    [problem] = load_jsonl(path)
    assert (problem.source, problem.answer) == ("mine", "4")


# ----------------------------------------------------------------------------------------- hub (faked)

def _fake_datasets(monkeypatch, rows=None, error=None):
    calls = []

    def load_dataset(dataset_id, config=None, split=None):
        calls.append((dataset_id, config, split))
        if error:
            raise error
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_hub_mapping_olympiadbench(monkeypatch):
    rows = [{"id": 1618, "question": "Find all triples", "final_answer": ["$(1,8,19), (2,7,13)$"]},
            {"id": 1619, "question": "Two answers", "final_answer": ["$a$", "$\\frac{1}{2}$"]}]
    calls = _fake_datasets(monkeypatch, rows)
    bench = load_benchmark("olympiadbench", hub=True)
    assert calls == [("math-ai/olympiadbench", None, "test")]
    assert [(p.id, p.answer) for p in bench.problems] == [("olympiadbench-1618", "(1,8,19), (2,7,13)"),
                                                          ("olympiadbench-1619", "a, \\frac{1}{2}")]


def test_hub_mapping_amc_and_index_ids(monkeypatch):
    _fake_datasets(monkeypatch, [{"id": 0, "question": "q", "answer": 27.0}, {"id": 1, "question": "r",
                                                                              "answer": -1.0}])
    assert [p.answer for p in load_benchmark("amc23", hub=True).problems] == ["27", "-1"]
    _fake_datasets(monkeypatch, [{"question": "q", "answer": "4.4e7"}, {"question": "r", "answer": "2"}])
    assert [p.id for p in load_benchmark("minerva", hub=True, limit=1).problems] == ["minerva-0"]


def test_hub_errors_are_one_readable_line(monkeypatch):
    _fake_datasets(monkeypatch, [{"problem": "p", "solution": "s"}])
    with pytest.raises(BenchmarkDataError, match=r"fields \['answer', 'unique_id'\] missing .* HUB_SPECS"):
        load_benchmark("math500", hub=True)
    _fake_datasets(monkeypatch, error=ConnectionError("no network"))
    with pytest.raises(BenchmarkDataError, match="HuggingFaceH4/aime_2024 .* ConnectionError: no network"):
        load_benchmark("aime24", hub=True)


def test_every_benchmark_has_a_hub_spec():
    assert set(HUB_SPECS) == set(BENCHMARK_NAMES)


# -------------------------------------------------------------------------------------------- gold check

def test_gold_answers_grade_correct_with_math_verify():
    # ~6 s on 2 cores: not marked slow
    problems = [p for name in BENCHMARK_NAMES for p in load_benchmark(name).problems]
    assert len(problems) == 1547
    start = time.monotonic()
    with GradingPool() as pool:
        verdicts = pool.grade(["\\boxed{" + p.answer + "}" for p in problems], [p.answer for p in problems],
                              grader="math_verify", timeout_s=10.0)
    failures = [(p.id, p.answer, v) for p, v in zip(problems, verdicts, strict=True) if v.score != 1.0]
    assert not failures, json.dumps([(i, a, str(v)) for i, a, v in failures], indent=1)
    assert time.monotonic() - start < 300


# ------------------------------------------------------------------------------- the data shipped in the repo


def test_shipped_files_match_the_sha256_in_sources():
    """Every file SOURCES.md pins is shipped byte for byte (a re-normalised or truncated copy fails)."""
    import hashlib

    from mtp_occ.assets import ASSETS_DIR

    text = (ASSETS_DIR / "SOURCES.md").read_text()
    pinned = {}
    for line in text.split("## SHA-256 of the produced files", 1)[1].splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 64 and "(uncompressed)" not in line:
            pinned[parts[1]] = parts[0]
    assert len(pinned) == 7, pinned
    for rel, digest in pinned.items():
        assert hashlib.sha256((ASSETS_DIR / rel).read_bytes()).hexdigest() == digest, rel


def test_data_file_takes_the_plain_copy_then_the_compressed_one(monkeypatch, tmp_path):
    import gzip

    from mtp_occ.assets import data_file

    monkeypatch.setenv("MTP_OCC_DATA", str(tmp_path))
    (tmp_path / "train").mkdir()
    assert data_file("train/x.jsonl") == tmp_path / "train" / "x.jsonl"  # neither: the name asked for
    with gzip.open(tmp_path / "train" / "x.jsonl.gz", "wt") as f:
        f.write(GOOD + "\n")
    assert data_file("train/x.jsonl") == tmp_path / "train" / "x.jsonl.gz"
    assert [p.id for p in load_jsonl(data_file("train/x.jsonl"))] == ["a-1"]
    (tmp_path / "train" / "x.jsonl").write_text(GOOD + "\n")
    assert data_file("train/x.jsonl") == tmp_path / "train" / "x.jsonl"


def test_dapo_config_reads_the_shipped_compressed_copy(monkeypatch):
    from mtp_occ.assets import ASSETS_DIR
    from mtp_occ.config import compose
    from mtp_occ.data import build_prompts

    monkeypatch.delenv("MTP_OCC_DATA", raising=False)
    cfg = compose(["data=dapo_math_17k", "eval=math6", "reward=dapo", "model=smollm2_135m"])
    assert Path(cfg.data.path) == ASSETS_DIR / "train" / "dapo-math-17k.jsonl.gz"
    prompts = build_prompts(cfg.data, cfg.data.seed)
    assert len(prompts) == 17_917
