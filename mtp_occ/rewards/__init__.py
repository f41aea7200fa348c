"""Verifiable rewards: final-answer extraction, three graders, and a crash-proof grading pool.

What it is
    `grade(completions, answers, grader=..., extract=...)` returns one `Verdict` per completion: score 1.0 or
    0.0, plus whether it timed out, what answer was extracted and any error. Extraction (`extract=`):
      - "boxed": the content of the LAST `\\boxed{...}` / `\\fbox{...}`, brace-matched (None when absent or
        unbalanced). Nested boxes: the last opened box wins, as in DAPO and math-verify.
      - "answer_line": the last DAPO-style "Answer: ..." line.
    Graders (`GRADERS`, name -> `(pred, gold) -> bool`):
      - "math_verify": math-verify `parse` of `\\boxed{pred}` and `\\boxed{gold}`, then `verify`.
      - "dapo": DAPO's string normaliser (verl `math_dapo.normalize_final_answer`), then exact match.
      - "exact": string equality ignoring whitespace (integer-answer synthetic tasks).
    "math_verify" and "dapo" run in `GradingPool` worker processes with a hard per-item wall-clock timeout
    enforced by the parent; "exact" runs inline.

How it departs from the references
    - math-verify's default `parse(completion)` (LatexExtractionConfig + ExprExtractionConfig) falls back to
      the last number anywhere in the text (so a truncated, box-less completion can be graded correct;
      `tests/test_rewards.py` pins that we do not) and ExprExtractionConfig runs sympy's `parse_expr` (an eval) on model text. We extract
      the box ourselves and parse only `\\boxed{pred}` with `LatexExtractionConfig(boxed_match_priority=0)`;
      no box scores 0. Only the trusted gold also gets ExprExtractionConfig.
    - math-verify's own timeouts are whole-second `signal.alarm`s per call that add up (parse gold, parse
      pred, every verify pair). We switch them off and give each item ONE float budget (`setitimer`) in the
      worker; the parent kills the worker at budget + `grace_s`, the backstop for hangs inside C code
      (a huge integer power never returns to the interpreter, so no signal handler can run). Because an
      alarm can land anywhere, nothing first-time happens under it: the host imports and exercises
      math-verify and sympy's lazily loaded parts before it forks workers (`graders.warm_up`, no timer), and a worker
      whose item ran out of time is replaced (an interrupted import would leave a half-initialised module
      that fails every later item of that process, reported by math-verify as a wrong answer).
    - Plain-number spellings that LaTeX parsing gets wrong are rewritten on both sides: e-notation
      ("4.5e33", 62 Minerva golds, read as 4.5*e*33) -> `4.5\\times10^{33}`; a bare percentage ("62.5%",
      "8 \\%": a boxed percent does not parse) -> the number; "-1./3" -> "-1/3".
    - Box matching skips escaped braces (`\\{ \\}`, e.g. in `\\left\\{ ... \\right.`); DAPO counts them.
    - DAPO: scores 1/0 (verl returns +1/-1) and uses our `extract` mode, not "Answer:" lines in the last 300
      characters only. The normaliser keeps the reference's quirks (e.g. it deletes every "a " and "an ").
    - Workers cap their address space at (size after start-up + `memory_limit_gb`) rather than an absolute
      RLIMIT_AS, so the cap means the same whatever the interpreter maps at start-up.
    - Workers are forked from a clean host interpreter (`mtp_occ.rewards.host`), never from the caller's
      process and never by re-importing its `__main__`: unlike a `multiprocessing.Pool`, grading works from a
      script without a `__main__` guard, from stdin, a notebook or a thread.

How to use
    >>> from mtp_occ.rewards import grade
    >>> [v.score for v in grade(["so \\\\boxed{\\\\frac12}", "no box: 0.5"], ["0.5", "0.5"])]
    [1.0, 0.0]

    The default pool is created on first use (min(workers or cores, 8) processes), reused across calls and
    closed at exit. `with GradingPool(workers=4) as pool: pool.grade(...)` gives a private one.
"""

from mtp_occ.rewards.extract import EXTRACTORS, extract_answer_line, extract_boxed
from mtp_occ.rewards.graders import (
    GRADERS,
    POOLED_GRADERS,
    Verdict,
    dapo_equal,
    dapo_normalize,
    exact_equal,
    grade_one,
    math_verify_equal,
)
from mtp_occ.rewards.metrics import disagreement, reward_metrics
from mtp_occ.rewards.pool import GradingPool, default_pool, grade

__all__ = [
    "EXTRACTORS", "GRADERS", "POOLED_GRADERS", "GradingPool", "Verdict", "dapo_equal", "dapo_normalize",
    "default_pool", "disagreement", "exact_equal", "extract_answer_line", "extract_boxed", "grade", "grade_one",
    "math_verify_equal", "reward_metrics",
]
