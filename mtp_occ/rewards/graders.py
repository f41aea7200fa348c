"""The graders: `Verdict`, the three string comparisons (`exact`, `dapo`, `math_verify`) in the `GRADERS`
registry, and `grade_one`, which extracts and grades one completion in this process under a SIGALRM
budget. math-verify is imported lazily (first `math_verify_equal` call). See `mtp_occ.rewards` for how the
graders depart from their references."""

from __future__ import annotations

import functools
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

from mtp_occ.rewards.extract import EXTRACTORS


@dataclass(frozen=True)
class Verdict:
    score: float
    timeout: bool = False
    extracted: str | None = None
    error: str | None = None


# ------------------------------------------------------------------------------------------------ graders


def exact_equal(pred: str, gold: str) -> bool:
    pred, gold = "".join(pred.split()), "".join(gold.split())
    return bool(pred) and pred == gold


# The DAPO / Minerva normaliser (verl math_dapo.normalize_final_answer), same lists, same order.
_DAPO_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_DAPO_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)
_DAPO_REWRITES = tuple((re.compile(p), r) for p, r in (
    (r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$"),  # keep the first $...$ span of a line
    (r"(\\text\{)(.*?)(\})", r"\2"),
    (r"(\\textbf\{)(.*?)(\})", r"\2"),
    (r"(\\overline\{)(.*?)(\})", r"\2"),
    (r"(\\boxed\{)(.*)(\})", r"\2"),
    (r"(frac)([^{])(.)", r"frac{\2}{\3}"),  # \frac12 -> \frac{1}{2}
    (r"(sqrt)([^{])", r"sqrt{\2}"),  # \sqrt2 -> \sqrt{2}
))


def dapo_normalize(answer: str) -> str:
    """DAPO's `normalize_final_answer`: keep the right side of '=', drop units and TeX noise."""
    text = answer.split("=")[-1]
    for old, new in _DAPO_SUBSTITUTIONS:
        text = text.replace(old, new)
    for junk in _DAPO_REMOVED:
        text = text.replace(junk, "")
    for pattern, repl in _DAPO_REWRITES:
        text = pattern.sub(repl, text)
    text = text.replace("$", "")
    if text.replace(",", "").isdigit():
        text = text.replace(",", "")
    return text.strip()


def dapo_equal(pred: str, gold: str) -> bool:
    pred = dapo_normalize(pred)
    return bool(pred) and pred == dapo_normalize(gold)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_NUMBER_REWRITES = (
    # "4.5e33" (Minerva): LaTeX parsing reads it as 4.5*e*33
    (re.compile(rf"^\s*({_NUMBER})[eE]([-+]?\d+)\s*$"), lambda m: f"{m[1]}\\times10^{{{int(m[2])}}}"),
    # "62.5%", "8 \\%" (OlympiadBench): a boxed percent does not parse at all; compare the number
    (re.compile(rf"^\s*({_NUMBER})\s*\\?%\s*$"), lambda m: m[1]),
    # "-1./3" (Minerva, Python-style float literal)
    (re.compile(r"(\d)\.(?=/)"), lambda m: m[1]),
)


def _latex_number(text: str) -> str:
    """Rewrite plain-number spellings LaTeX parsing gets wrong; applied to prediction and gold alike."""
    for pattern, repl in _NUMBER_REWRITES:
        text = pattern.sub(repl, text)
    return text


@functools.cache
def _math_verify():
    import math_verify
    import math_verify.grader
    import math_verify.parser

    # We time items ourselves (see the `mtp_occ.rewards` docstring); this only silences the one-time
    # "timeout is disabled" warning that math-verify prints when its own alarms are off.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    boxed = math_verify.LatexExtractionConfig(boxed_match_priority=0)
    return math_verify, [boxed], [boxed, math_verify.ExprExtractionConfig()]


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    mv, _, gold_config = _math_verify()
    return mv.parse("\\boxed{" + _latex_number(gold) + "}", extraction_config=gold_config,
                    parsing_timeout=None)


def math_verify_equal(pred: str, gold: str) -> bool:
    mv, pred_config, _ = _math_verify()
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} does not parse with math-verify; fix the benchmark row "
                         "(answers are bare LaTeX without $ or \\boxed)")
    pred_parsed = mv.parse("\\boxed{" + _latex_number(pred) + "}", extraction_config=pred_config,
                           parsing_timeout=None)
    return bool(pred_parsed) and mv.verify(gold_parsed, pred_parsed, timeout_seconds=None)


# (pred, gold) pairs whose first grading imports what math-verify and sympy load lazily (sympy's
# assumptions wrappers and combinatorics behind a tuple with π, intervals, sets, percentages, e-notation,
# equations, matrices): `warm_up` grades them once, with no timer running.
WARM_UP_ITEMS = (
    ("1/2", "\\frac{1}{2}"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(0, 1]", "(0,1]"), ("\\{1, 2\\}", "\\{2, 1\\}"), ("62.5\\%", "62.5%"), ("4.5 \\times 10^{33}", "4.5e33"),
    ("x = 5", "5"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
)


def warm_up() -> None:
    """Import and exercise math-verify (and the DAPO normaliser) outside any timer. A SIGALRM that lands
    inside a first-time import leaves a half-initialised module in `sys.modules`, and every later item of
    that process then fails with an AttributeError that math-verify reports as "does not parse" or a wrong
    answer; so the grading host calls this before it forks its workers, which inherit the imports."""
    for pred, gold in WARM_UP_ITEMS:
        if not math_verify_equal(pred, gold):
            raise RuntimeError(f"math-verify failed its warm-up item {pred!r} == {gold!r}: check that "
                               "`python -c 'import math_verify'` works and that the locked versions are installed")
    dapo_equal("1/2", "\\frac{1}{2}")


GRADERS: dict[str, Callable[[str, str], bool]] = {
    "math_verify": math_verify_equal,
    "dapo": dapo_equal,
    "exact": exact_equal,
}
POOLED_GRADERS = frozenset({"math_verify", "dapo"})  # sympy / backtracking regexes can hang: isolate them


class _ItemTimeout(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math-verify's `except Exception` cannot eat it."""


def _raise_timeout(signum, frame):
    raise _ItemTimeout


def grade_one(completion: str, answer: str, grader: str = "math_verify", extract: str = "boxed",
              timeout_s: float = 2.0) -> Verdict:
    """Extract and grade one completion in this process. Pooled graders run under a SIGALRM budget of
    `timeout_s`, so call them from the main thread (pool workers do); prefer `grade()` elsewhere."""
    compare = _lookup(GRADERS, grader, "grader")
    pred = _lookup(EXTRACTORS, extract, "extract")(completion)
    if pred is None or not pred.strip():
        return Verdict(0.0, extracted=pred)
    if grader not in POOLED_GRADERS:
        return Verdict(float(compare(pred, answer)), extracted=pred)
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            return Verdict(float(compare(pred, answer)), extracted=pred)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return Verdict(0.0, timeout=True, extracted=pred, error=f"timed out after {timeout_s:g} s")
    except Exception as e:  # RecursionError and MemoryError included: the item fails, the worker lives
        return Verdict(0.0, extracted=pred, error=f"{type(e).__name__}: {e}"[:500])
    finally:
        signal.signal(signal.SIGALRM, previous)


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(sorted(registry))}")
    return registry[name]
