"""Answer extraction, the three graders, and the grading pool's timeout / crash handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from mtp_occ.rewards import (
    GRADERS,
    GradingPool,
    Verdict,
    dapo_normalize,
    disagreement,
    extract_answer_line,
    extract_boxed,
    grade,
    reward_metrics,
)

HANG_GUARD_S = 30.0  # a hang guard, not a performance assertion


@pytest.fixture(scope="module")
def pool():
    with GradingPool(workers=2) as p:
        yield p


# ------------------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
    ("\\boxed{\\frac{1}{\\boxed{2}}}", "2"),  # nested boxes: the last opened box wins (DAPO, math-verify)
    ("\\fbox{7}", "7"),
    ("\\boxed{3} and \\fbox{4}", "4"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not grouping braces
    ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
    ("\\boxed{}", ""),
    ("no box here: 5", None),
    ("", None),
    ("\\boxed{\\frac{1}{2}", None),  # never closes
    ("\\boxed{1} and then \\boxed{2", None),  # the last box is unbalanced
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_hostile_is_fast():
    start = time.monotonic()
    nested = "{" * 10_000 + "1" + "}" * 10_000
    assert extract_boxed("\\boxed{" + nested + "}") == nested
    assert extract_boxed("\\boxed{" * 50_000) is None
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("text, expected", [
    ("work\nAnswer: 42", "42"),
    ("Answer: 1\nmore\nanswer:  $\\frac{1}{2}$ ", "$\\frac{1}{2}$"),
    ("The final answer is 3", None),
])
def test_extract_answer_line(text, expected):
    assert extract_answer_line(text) == expected


# -------------------------------------------------------------------------------------- math_verify grader

MATH_VERIFY_TABLE = [
    # (completion, gold, expected score)
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", 1.0),
    ("\\boxed{(0, 1]}", "(0,1]", 1.0),
    ("\\boxed{[0, 1]}", "(0,1]", 0.0),  # a different interval
    ("\\boxed{10^{3}}", "1000", 1.0),
    ("\\boxed{4.5 \\times 10^{33}}", "4.5e33", 1.0),  # Minerva e-notation gold
    ("\\boxed{4.5e33}", "4.5e33", 1.0),
    ("\\boxed{4.4e33}", "4.5e33", 0.0),
    ("\\boxed{62.5\\%}", "62.5%", 1.0),
    ("\\boxed{62.5}", "62.5%", 1.0),
    ("\\boxed{-\\frac{1}{3}}", "-1./3", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{3}", "2", 0.0),
    ("\\boxed{-2}", "2", 0.0),
    ("", "2", 0.0),
    ("the answer is 2", "2", 0.0),  # no box: no "last number anywhere" fallback
    ("$2$ but the box says \\boxed{3}", "2", 0.0),
    ("\\boxed{2} first, finally \\boxed{3}", "3", 1.0),
    ("\\boxed{\\frac{1}{\\boxed{2}}}", "2", 1.0),  # the inner (last) box
    ("\\boxed{}", "2", 0.0),
]


def test_math_verify_table(pool):
    completions, golds, expected = zip(*MATH_VERIFY_TABLE, strict=True)
    verdicts = pool.grade(list(completions), list(golds), grader="math_verify", timeout_s=5.0)
    got = [v.score for v in verdicts]
    assert got == list(expected), [(c, g, s) for (c, g, _), s in zip(MATH_VERIFY_TABLE, got, strict=True)]
    assert not any(v.timeout for v in verdicts)
    assert verdicts[0].extracted == "\\frac{1}{2}" and verdicts[17].extracted is None


def test_hostile_outputs_time_out_without_blocking_the_batch(pool, tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    hostile = [
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{" + "1+" * 50_000 + "1}",  # ~100k characters
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",  # 10k nested braces
        "\\boxed{(10^{10})!}",
        f"\\boxed{{__import__('os').system('touch {marker}')}}",
        f"\\boxed{{eval(\"open('{marker}', 'w')\")}}",
        "x" * 100_000,
    ]
    normal = ["\\boxed{\\frac{1}{2}}", "\\boxed{7}", "\\boxed{8}"]
    completions = [normal[0], *hostile[:3], normal[1], *hostile[3:], normal[2]]
    golds = ["0.5", "1", "2", "3", "7", "4", "5", "6", "7", "7"]
    start = time.monotonic()
    verdicts = pool.grade(completions, golds, grader="math_verify", timeout_s=1.0)
    assert time.monotonic() - start < HANG_GUARD_S
    assert [v.score for v in verdicts] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 0, 0.0]
    assert verdicts[1].timeout and verdicts[4].timeout is False
    assert not marker.exists(), "model text was executed"
    # the pool still grades normally afterwards
    assert [v.score for v in pool.grade(["\\boxed{2}"] * 4, ["2"] * 4)] == [1.0] * 4


def test_parent_kills_a_stuck_worker_and_requeues_its_chunk(pool):
    """A SIGSTOPped worker stands in for a hang in C code that no in-worker signal can interrupt."""
    pool.start()  # every worker up and ready, so each gets a chunk
    os.kill(pool.worker_pids()[0], signal.SIGSTOP)
    n = 40
    start = time.monotonic()
    verdicts = pool.grade([f"\\boxed{{{i}}}" for i in range(n)], [str(i) for i in range(n)], timeout_s=1.0)
    assert time.monotonic() - start < HANG_GUARD_S
    timed_out = [v for v in verdicts if v.timeout]
    assert len(timed_out) == 1 and "killed" in timed_out[0].error
    assert timed_out[0].extracted.isdigit()  # the parent fills in what the dead worker could not report
    assert sum(v.score for v in verdicts) == n - 1  # everything else was graded, re-queued items included


def test_a_dying_worker_costs_only_its_current_item(pool):
    pool.start()
    pid = pool.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)  # it holds its chunk ...
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()  # ... and dies with it
    n = 40
    verdicts = pool.grade([f"\\boxed{{{i}}}" for i in range(n)], [str(i) for i in range(n)], timeout_s=5.0)
    died = [v for v in verdicts if v.error and "died" in v.error]
    assert len(died) == 1 and died[0].score == 0.0 and not died[0].timeout
    assert sum(v.score for v in verdicts) == n - 1


def test_memory_limit_turns_a_blowup_into_a_zero():
    with GradingPool(workers=1, memory_limit_gb=0.1) as small:
        verdicts = small.grade(["\\boxed{2^{2^{40}}}", "\\boxed{3}"], ["1", "3"], timeout_s=10.0)
    assert [v.score for v in verdicts] == [0.0, 1.0]
    # without the cap this runs into the 10 s budget; with it sympy hits MemoryError (math-verify turns
    # that into "not equal") and the worker lives on to grade the next item
    assert not verdicts[0].timeout


def test_grade_default_pool_and_argument_errors():
    assert [v.score for v in grade(["\\boxed{0.5}", "0.5"], ["\\frac12", "0.5"])] == [1.0, 0.0]
    assert grade([], []) == []
    with pytest.raises(ValueError, match="unknown grader 'nope'; valid: dapo, exact, math_verify"):
        grade(["x"], ["x"], grader="nope")
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        grade(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown extract"):
        grade(["a"], ["a"], extract="first")


# ------------------------------------------------------------------------------------ dapo / exact graders

@pytest.mark.parametrize("raw, normalized", [
    ("x = 5", "5"),
    ("\\text{(A)}", "(A)"),
    ("$\\frac12$", "\\frac{1}{2}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("10 \\text{ cm}", "10"),
    ("90^\\circ", "90"),
    ("1,000", "1000"),
    ("\\$5.00", "5.00"),
    ("5 \\text{ meters}", "5"),
    ("\\boxed{7}", "7"),
])
def test_dapo_normalize(raw, normalized):
    assert dapo_normalize(raw) == normalized


DAPO_TABLE = [
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{x=5}", "5", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 0.0),  # string match: no numeric equivalence
    ("\\boxed{3}", "2", 0.0),
    ("no box", "2", 0.0),
    ("\\boxed{}", "", 0.0),
]


def test_dapo_table(pool):
    completions, golds, expected = zip(*DAPO_TABLE, strict=True)
    assert [v.score for v in pool.grade(list(completions), list(golds), grader="dapo")] == list(expected)


def test_dapo_answer_line_mode():
    verdicts = grade(["...\nAnswer: 1,000", "Answer: 7\nAnswer: 8"], ["1000", "7"], grader="dapo",
                     extract="answer_line")
    assert [v.score for v in verdicts] == [1.0, 0.0]


def test_exact_grader_is_inline_and_whitespace_insensitive():
    verdicts = grade(["\\boxed{ 93 }", "\\boxed{-5}", "\\boxed{93.0}", "93"], ["93", "- 5", "93", "93"],
                     grader="exact")
    assert [v.score for v in verdicts] == [1.0, 1.0, 0.0, 0.0]
    assert verdicts[0].extracted == " 93 " and verdicts[3].extracted is None


def test_registry_names():
    assert set(GRADERS) == {"math_verify", "dapo", "exact"}


# ------------------------------------------------------------------------------------------------ metrics

def test_disagreement_and_reward_metrics():
    a = [Verdict(1.0), Verdict(0.0), Verdict(1.0), Verdict(0.0)]
    b = [Verdict(1.0), Verdict(1.0), Verdict(0.0), Verdict(0.0)]
    assert disagreement(a, b) == 0.5
    assert disagreement(a, a) == 0.0
    assert disagreement([], []) == 0.0
    with pytest.raises(ValueError, match="3 vs 4"):
        disagreement(a[:3], b)
    verdicts = [Verdict(1.0, extracted="1"), Verdict(0.0, timeout=True, extracted="9^9^9", error="t"),
                Verdict(0.0, error="boom", extracted="x"), Verdict(0.0)]
    assert reward_metrics(verdicts) == {"reward/graded": 4.0, "reward/timeouts": 1.0, "reward/errors": 1.0,
                                        "reward/no_answer_frac": 0.25}
    assert reward_metrics([])["reward/no_answer_frac"] == 0.0


# --------------------------------------------------------------------- grading from any caller's __main__

GRADE_SNIPPET = ("from mtp_occ.rewards import grade\n"
                 "print('scores', [v.score for v in grade(['\\\\boxed{1/2}', '\\\\boxed{3}'], ['0.5', '2'])])\n")
THREADED = ("import threading\n"
            "from mtp_occ.rewards import grade\n"
            "out = []\n"
            "t = threading.Thread(target=lambda: out.append([v.score for v in grade(['\\\\boxed{4}'], ['4'])]))\n"
            "t.start(); t.join()\n"
            "print('scores', out[0])\n")


@pytest.mark.parametrize("how", ["stdin", "unguarded_script", "thread", "dash_c"])
def test_grading_works_from_any_script_without_a_main_guard(tmp_path, how):
    """Workers must never re-import the caller's __main__ (a spawn/forkserver pool does: stdin and an
    unguarded script then kill every worker at start-up, or run the script again in each)."""
    code = THREADED if how == "thread" else GRADE_SNIPPET
    script = tmp_path / "quick.py"
    script.write_text(code + "open(__file__ + '.ran', 'a').write('x')\n" if how == "unguarded_script" else code)
    cmd = {"stdin": [sys.executable, "-"], "unguarded_script": [sys.executable, str(script)],
           "thread": [sys.executable, str(script)], "dash_c": [sys.executable, "-c", code]}[how]
    p = subprocess.run(cmd, input=code if how == "stdin" else None, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    expected = "scores [1.0]" if how == "thread" else "scores [1.0, 0.0]"
    assert expected in p.stdout
    if how == "unguarded_script":
        assert (tmp_path / "quick.py.ran").read_text() == "x"  # the script body ran once, in the caller only


def test_grading_works_in_a_notebook(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(GRADE_SNIPPET)])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert "scores [1.0, 0.0]" in nb.cells[0].outputs[0]["text"]


def test_a_killed_host_is_replaced_and_the_call_retried():
    with GradingPool(workers=1) as p:
        p.start()
        os.kill(p._host[0].pid, signal.SIGKILL)
        assert [v.score for v in p.grade(["\\boxed{2}"], ["2"])] == [1.0]


def test_an_item_timeout_retires_its_worker_and_requeues_the_rest(pool):
    """An in-worker timeout (SIGALRM) may have cut an import or a cache fill in half: the worker is replaced,
    the rest of its chunk graded by clean workers."""
    pool.start()
    before = set(pool.worker_pids())
    n = 20
    completions = ["\\boxed{9^{9^{9^{9}}}}", *(f"\\boxed{{{i}}}" for i in range(1, n))]
    verdicts = pool.grade(completions, ["1", *(str(i) for i in range(1, n))], timeout_s=1.0)
    assert verdicts[0].timeout and "timed out" in verdicts[0].error  # the worker's own alarm, not a kill
    assert [v.score for v in verdicts[1:]] == [1.0] * (n - 1) and not any(v.error for v in verdicts[1:])
    assert len(before - set(pool.worker_pids())) == 1  # exactly the worker that timed out was replaced


def test_warm_up_leaves_nothing_to_import_under_an_items_alarm():
    """After `warm_up`, grading the math-verify table imports no module: a first-time import interrupted by
    an item's SIGALRM would leave a half-initialised module that fails every later item of that process."""
    code = ("import sys, json\n"
            "from mtp_occ.rewards.graders import grade_one, warm_up\n"
            "warm_up()\n"
            "before = set(sys.modules)\n"
            "for c, g, _ in json.loads(sys.argv[1]): grade_one(c, g, timeout_s=30.0)\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))\n")
    table = json.dumps([*MATH_VERIFY_TABLE, ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
                                             "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0)])
    out = subprocess.run([sys.executable, "-c", code, table], capture_output=True, text=True, timeout=120,
                         check=True)
    assert json.loads(out.stdout) == []
