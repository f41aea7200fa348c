"""The eval runner end to end with a fake generate_fn, prompt templates, and the paired run comparison."""

from __future__ import annotations

import json

import pytest

from mtp_occ.eval.benchmarks import BENCHMARK_NAMES, Benchmark, Problem, load_benchmark
from mtp_occ.eval.compare import compare_runs, format_table, main
from mtp_occ.eval.runner import evaluate, flat_metrics
from mtp_occ.eval.templates import BOXED_INSTRUCTION, TEMPLATES, format_prompt
from mtp_occ.rundir import TMP_MARK

SETTINGS_KEYS = {"template", "temperature", "top_p", "max_new_tokens", "k", "grader", "timeout_s", "seed",
                 "limit"}
BENCH_KEYS = {"n", "k", "avg", "avg_ci", "pass", "pass_ci", "maj", "maj_ci", "timeouts"}
SAMPLE_KEYS = {"benchmark", "id", "sample", "prompt", "completion", "answer", "extracted", "score", "timeout"}


def _fake_generate(benchmarks, template):
    """Problem 0 of each benchmark: both samples right; problem 1: wrong then right; problem 2: no box."""
    plan = {}
    for b in benchmarks:
        for i, p in enumerate(b.problems):
            right, wrong = f"so \\boxed{{{p.answer}}}", "so \\boxed{\\text{nope}}"
            plan[format_prompt(p.problem, template)] = [[right, right], [wrong, right], ["no idea", "?"]][i]
    calls = []

    def generate(prompts, n):
        calls.append((len(prompts), n))
        return [plan[p][:n] for p in prompts]

    return generate, calls


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    benchmarks = [load_benchmark(name, limit=3) for name in BENCHMARK_NAMES]
    generate, calls = _fake_generate(benchmarks, "qwen_boxed")
    summary = evaluate(generate, benchmarks, k=2, template="qwen_boxed", tokenizer=None, temperature=1.0,
                       top_p=0.95, max_new_tokens=64, grader="math_verify", timeout_s=2.0, out_dir=out,
                       step=7, seed=0, n_boot=200, limit=3)
    return out, summary, calls


def test_summary_matches_the_schema(evaluated):
    out, summary, calls = evaluated
    assert calls == [(18, 2)]  # one generate call for all benchmarks
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert json.loads((out / "step_7" / "summary.json").read_text()) == summary
    assert set(summary) == {"step", "settings", "benchmarks", "average"} and summary["step"] == 7
    assert summary["settings"] == {"template": "qwen_boxed", "temperature": 1.0, "top_p": 0.95,
                                   "max_new_tokens": 64, "k": 2, "grader": "math_verify", "timeout_s": 2.0,
                                   "seed": 0, "limit": 3}
    assert set(summary["settings"]) == SETTINGS_KEYS
    assert list(summary["benchmarks"]) == list(BENCHMARK_NAMES)
    for stats in summary["benchmarks"].values():
        assert set(stats) == BENCH_KEYS
        assert (stats["n"], stats["k"], stats["timeouts"]) == (3, 2, 0)
        # avg = (1 + 1/2 + 0) / 3; pass = 2/3; maj: problem 1 ties "nope" (first) vs right -> 1/3
        assert stats["avg"] == pytest.approx(0.5)
        assert stats["pass"] == pytest.approx(2 / 3)
        assert stats["maj"] == pytest.approx(1 / 3)
        for m in ("avg", "pass", "maj"):
            lo, hi = stats[f"{m}_ci"]
            assert 0.0 <= lo <= stats[m] <= hi <= 1.0
    assert summary["average"] == pytest.approx({"avg": 0.5, "pass": 2 / 3, "maj": 1 / 3})
    assert not [p for p in out.rglob(f"*{TMP_MARK}*")]  # atomic writes leave no temp files


def test_samples_jsonl_has_every_sample(evaluated):
    out, _, _ = evaluated
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 6 * 3 * 2
    assert all(set(r) == SAMPLE_KEYS for r in lines)
    first = lines[0]
    assert (first["benchmark"], first["sample"], first["score"]) == ("aime24", 0, 1.0)
    assert first["timeout"] is False
    assert first["prompt"].endswith(BOXED_INSTRUCTION) and first["extracted"] == first["answer"]
    no_box = [r for r in lines if r["completion"] in ("no idea", "?")]
    assert len(no_box) == 12 and all(r["extracted"] is None and r["score"] == 0.0 for r in no_box)


def test_flat_metrics(evaluated):
    _, summary, _ = evaluated
    flat = flat_metrics(summary)
    assert len(flat) == 3 * 6 + 3
    assert flat["eval/math500/avg"] == pytest.approx(0.5)
    assert flat["eval/average/pass"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in flat.values())


def test_evaluate_rejects_bad_generate_output(tmp_path):
    bench = [Benchmark("toy", [Problem("toy-1", "1+1", "2", "toy")])]
    common = dict(k=2, template="plain", tokenizer=None, temperature=1.0, top_p=1.0, max_new_tokens=8,
                  grader="exact", timeout_s=1.0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="returned 1 completions for prompt 0, expected n=2"):
        evaluate(lambda prompts, n: [["\\boxed{2}"]], bench, **common)
    with pytest.raises(ValueError, match="unknown prompt template 'chatml'"):
        evaluate(lambda prompts, n: [["x"] * n], bench, **common | {"template": "chatml"})
    summary = evaluate(lambda prompts, n: [["\\boxed{2}", "\\boxed{3}"]], bench, **common)
    assert summary["step"] is None and summary["benchmarks"]["toy"]["avg"] == 0.5
    assert not (tmp_path / "step_None").exists()


# -------------------------------------------------------------------------------------------- templates

class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_templates():
    suffix = "\n" + BOXED_INSTRUCTION
    assert set(TEMPLATES) == {"qwen_boxed", "mimo", "plain"}
    assert format_prompt("Find {x}.", "qwen_boxed") == "Find {x}." + suffix  # braces survive
    assert format_prompt("2+2=", "plain", _ChatTokenizer()) == "2+2="  # never chat-formatted
    assert format_prompt("P", "qwen_boxed", _ChatTokenizer()) == f"user:P{suffix}|assistant:"
    assert format_prompt("P", "mimo", _ChatTokenizer()) == f"system:|user:P{suffix}|assistant:"
    no_template = _ChatTokenizer()
    no_template.chat_template = None
    assert format_prompt("P", "mimo", no_template) == "P" + suffix
    with pytest.raises(ValueError, match="valid: mimo, plain, qwen_boxed"):
        format_prompt("P", "qwen")


# ---------------------------------------------------------------------------------------------- compare

def _write_run(run_dir, scores):
    """scores: {benchmark: {id: [sample scores]}} -> run_dir/eval/samples.jsonl"""
    (run_dir / "eval").mkdir(parents=True)
    with open(run_dir / "eval" / "samples.jsonl", "w") as f:
        for bench, problems in scores.items():
            for pid, samples in problems.items():
                for j, s in enumerate(samples):
                    f.write(json.dumps({"benchmark": bench, "id": pid, "sample": j, "score": s}) + "\n")


def test_compare_runs(tmp_path, capsys):
    base = {"aime24": {f"a{i}": [1.0, 0.0] for i in range(30)},
            "math500": {f"m{i}": [1.0, 1.0] for i in range(40)}}
    better = {"aime24": {f"a{i}": [1.0, 1.0 if i < 15 else 0.0] for i in range(30)},  # +0.5 on half
              "math500": {f"m{i}": [1.0, 1.0] for i in range(40)} | {"extra": [0.0, 0.0]}}
    _write_run(tmp_path / "A", base)
    _write_run(tmp_path / "B", better)
    same = compare_runs(tmp_path / "A", tmp_path / "A" / "eval" / "samples.jsonl", n_boot=500)
    assert all(r["diff"] == 0.0 and r["lo"] == r["hi"] == 0.0 and r["p_value"] == 1.0 for r in same.values())
    result = compare_runs(tmp_path / "A", tmp_path / "B" / "eval", n_boot=2000)
    aime = result["aime24"]
    assert (aime["a"], aime["b"], aime["n"]) == (0.5, 0.75, 30)
    assert aime["diff"] == pytest.approx(0.25) and aime["lo"] > 0 and aime["p_value"] < 0.01
    assert result["math500"]["diff"] == 0.0 and result["math500"]["unmatched"] == 1
    assert result["average"]["diff"] == pytest.approx(0.125)  # unweighted over the two benchmarks
    table = format_table(result)
    assert "| aime24 | 30 | 50.0 | 75.0 | +25.0 |" in table
    main([str(tmp_path / "A"), str(tmp_path / "B"), "--n-boot", "200"])
    assert "| math500 | 40 | 100.0 | 100.0 | +0.0 |" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="eval/samples.jsonl"):
        compare_runs(tmp_path / "A", tmp_path / "missing")
