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
      the last number anywhere in the text (4.6% of truncated, box-less completions graded correct, see
      TOOLCHAIN.md) and ExprExtractionConfig runs sympy's `parse_expr` (an eval) on model text. We extract
      the box ourselves and parse only `\\boxed{pred}` with `LatexExtractionConfig(boxed_match_priority=0)`;
      no box scores 0. Only the trusted gold also gets ExprExtractionConfig.
    - math-verify's own timeouts are whole-second `signal.alarm`s per call that add up (parse gold, parse
      pred, every verify pair). We switch them off and give each item ONE float budget (`setitimer`) in the
      worker; the parent kills the worker at budget + `grace_s`, the backstop for hangs inside C code
      (a huge integer power never returns to the interpreter, so no signal handler can run).
    - Plain-number spellings that LaTeX parsing gets wrong are rewritten on both sides: e-notation
      ("4.5e33", 62 Minerva golds, read as 4.5*e*33) -> `4.5\\times10^{33}`; a bare percentage ("62.5%",
      "8 \\%": a boxed percent does not parse) -> the number; "-1./3" -> "-1/3".
    - Box matching skips escaped braces (`\\{ \\}`, e.g. in `\\left\\{ ... \\right.`); DAPO counts them.
    - DAPO: scores 1/0 (verl returns +1/-1) and uses our `extract` mode, not "Answer:" lines in the last 300
      characters only. The normaliser keeps the reference's quirks (e.g. it deletes every "a " and "an ").
    - Workers cap their address space at (size after start-up + `memory_limit_gb`) rather than an absolute
      RLIMIT_AS: spawn/forkserver children re-import `__main__`, which for a torch entry point already maps
      GBs, and an absolute cap would then fail every item with MemoryError.

How to use
    >>> from mtp_occ.rewards import grade
    >>> [v.score for v in grade(["so \\\\boxed{\\\\frac12}", "no box: 0.5"], ["0.5", "0.5"])]
    [1.0, 0.0]

    The default pool is created on first use (min(workers or cores, 8) processes), reused across calls and
    closed at exit. `with GradingPool(workers=4) as pool: pool.grade(...)` gives a private one. Workers
    re-import the `__main__` module (spawn/forkserver semantics): a script that grades must keep its
    top-level code under `if __name__ == "__main__":`, and heavy top-level imports there (torch) are
    paid once per worker start.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing as mp
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_for_ready


@dataclass(frozen=True)
class Verdict:
    score: float
    timeout: bool = False
    extracted: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------- extraction

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
# `\\.` swallows escaped characters, so `\{`, `\}` (literal braces, e.g. `\left\{ ... \right.`) and `\\{`
# are handled the way LaTeX groups them.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}`; None when there is none or it never closes."""
    opener = max(_BOX_OPENERS, key=text.rfind)
    pos = text.rfind(opener)
    if pos < 0:
        return None
    start, depth = pos + len(opener), 1
    for tok in _BRACE_TOKEN.finditer(text, start):
        char = tok.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:tok.start()]
    return None


def extract_answer_line(text: str) -> str | None:
    """The text after the last "Answer:" (DAPO-Math's output format), stripped; None when absent."""
    matches = _ANSWER_LINE.findall(text)
    return matches[-1].strip() if matches else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {"boxed": extract_boxed,
                                                       "answer_line": extract_answer_line}

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

    # We time items ourselves (see the module docstring); this only silences the one-time
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


# ------------------------------------------------------------------------------------------- worker side


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _worker_main(conn, memory_limit_bytes: int) -> None:
    """Grade chunks of `(index, grader, completion, answer, extract, timeout_s)`; reply per item."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    grade_one("\\boxed{1/2}", "\\frac{1}{2}")  # import + warm math-verify before the clock runs
    if memory_limit_bytes > 0 and os.path.exists("/proc/self/statm"):
        limit = _address_space_bytes() + memory_limit_bytes
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    conn.send(("ready", os.getpid()))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if chunk is None:
            return
        for index, grader, completion, answer, extract, timeout_s in chunk:
            conn.send((index, grade_one(completion, answer, grader, extract, timeout_s)))


# ------------------------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: object  # multiprocessing Connection
    started: float
    ready: bool = False
    items: deque | None = None  # indices sent and not answered yet, in the order the worker grades them
    item_started: float = 0.0  # when the worker began items[0] (chunk sent, or previous item answered)


def _stop(worker: _Worker) -> None:
    worker.process.kill()
    worker.process.join(timeout=5)
    worker.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        _stop(worker)
    workers.clear()


class GradingPool:
    """Worker processes grading items with a hard per-item wall-clock timeout.

    Items go out in chunks (throughput) but are timed one by one: a worker answers each item as it
    finishes, so the parent knows when the next one started. An item running past `timeout_s + grace_s`
    gets its worker killed and replaced and scores 0 with `timeout=True`; the rest of that chunk is
    re-queued. A worker that dies (segfault, OOM kill) costs its current item (score 0, `error` set).
    Calls from several threads are serialised by a lock.
    """

    def __init__(self, workers: int | None = None, *, memory_limit_gb: float = 4.0, grace_s: float = 1.0,
                 start_method: str = "forkserver", startup_timeout_s: float = 120.0, max_chunk: int = 16):
        self.size = max(1, workers or os.cpu_count() or 1)
        self.grace_s, self.startup_timeout_s, self.max_chunk = grace_s, startup_timeout_s, max_chunk
        self._memory_limit = int(memory_limit_gb * 2**30)
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Fork workers from a server that already imported math-verify: a replacement after a
            # timeout kill starts in ~0.1 s. No effect if this process's forkserver is already running.
            self._ctx.set_forkserver_preload([__name__, "math_verify"])
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)  # also runs at exit

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def start(self) -> GradingPool:
        """Start every worker and wait until all are ready (optional: `grade()` starts them lazily)."""
        with self._lock:
            self._fill()
            while not all(w.ready for w in self._workers):
                self._collect([], deque(), float("inf"))
        return self

    def grade(self, completions: Sequence[str], answers: Sequence[str], grader: str = "math_verify",
              extract: str = "boxed", timeout_s: float = 2.0) -> list[Verdict]:
        _check_batch(completions, answers, grader, extract, timeout_s)
        items = [(i, grader, c, a, extract, timeout_s)
                 for i, (c, a) in enumerate(zip(completions, answers, strict=True))]
        results: list[Verdict | None] = [None] * len(items)
        pending = deque(range(len(items)))
        with self._lock:
            self._fill()
            try:
                while pending or any(w.items for w in self._workers):
                    self._dispatch(items, pending, results)
                    self._collect(results, pending, timeout_s + self.grace_s)
            except BaseException:  # e.g. Ctrl-C: busy workers would answer this call's items in the next
                for worker in [w for w in self._workers if w.items]:
                    _stop(worker)
                    self._workers.remove(worker)
                raise
        extractor = EXTRACTORS[extract]
        return [v if v.extracted is not None or not (v.timeout or v.error)  # type: ignore[union-attr]
                else replace(v, extracted=extractor(completions[i])) for i, v in enumerate(results)]

    def _fill(self) -> None:
        if self.closed:
            raise RuntimeError("GradingPool used after close(); create a new pool")
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn, self._memory_limit),
                                    name="mtp_occ-grader", daemon=True)
        from mtp_occ.preempt import shield_children

        with shield_children():  # SLURM signals every process of the step: USR2 would kill the workers
            process.start()
        child_conn.close()
        return _Worker(process, parent_conn, started=time.monotonic())

    def _retire(self, worker: _Worker, results: list, pending: deque, verdict: Verdict | None) -> None:
        """Give the current item `verdict` (None: it never ran), re-queue the rest, replace the worker."""
        items = list(worker.items or ())
        if items and verdict is not None:
            results[items.pop(0)] = verdict
        pending.extendleft(reversed(items))
        _stop(worker)
        self._workers[self._workers.index(worker)] = self._spawn()

    def _dispatch(self, items: list, pending: deque, results: list) -> None:
        for worker in list(self._workers):
            if not pending or not worker.ready or worker.items:
                continue
            if not worker.process.is_alive():  # died while idle: replace it before it swallows a chunk
                self._retire(worker, results, pending, None)
                continue
            size = min(self.max_chunk, max(1, len(pending) // (4 * self.size)), len(pending))
            worker.items = deque(pending.popleft() for _ in range(size))
            worker.item_started = time.monotonic()
            try:
                worker.conn.send([items[i] for i in worker.items])
            except OSError:  # died while idle: nothing of this chunk ran
                self._retire(worker, results, pending, None)

    def _collect(self, results: list, pending: deque, item_limit_s: float) -> None:
        now = time.monotonic()
        deadlines = [w.item_started + item_limit_s if w.ready else w.started + self.startup_timeout_s
                     for w in self._workers if w.items or not w.ready]
        wait_for_ready([w.conn for w in self._workers] + [w.process.sentinel for w in self._workers],
                       timeout=max(0.0, min(deadlines, default=now + 1.0) - now))
        for worker in list(self._workers):
            if not self._drain(worker, results) or not worker.process.is_alive():
                worker.process.join(timeout=5)
                code = worker.process.exitcode
                if not worker.ready:
                    raise RuntimeError(
                        f"a grading worker died while starting (exit code {code}); its traceback is on "
                        "stderr. Usual cause: a script that grades at import time. Workers re-import "
                        "__main__ (spawn/forkserver): put the script's code under "
                        "`if __name__ == '__main__':`")
                self._retire(worker, results, pending, Verdict(
                    0.0, error=f"grading worker died (exit code {code}; negative = killed by that signal)"))
            elif worker.items and time.monotonic() - worker.item_started > item_limit_s:
                self._retire(worker, results, pending,
                             Verdict(0.0, timeout=True, error=f"killed after {item_limit_s:g} s"))
            elif not worker.ready and time.monotonic() - worker.started > self.startup_timeout_s:
                raise RuntimeError(f"a grading worker did not start within {self.startup_timeout_s:g} s; "
                                   "check that `import math_verify` works in a fresh interpreter")

    def _drain(self, worker: _Worker, results: list) -> bool:
        """Read every message waiting from `worker`; False when its pipe is closed."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready = True
                    continue
                index, verdict = message
                if not worker.items or worker.items[0] != index:
                    raise RuntimeError(f"grading worker answered item {index}, expected {worker.items}")
                results[index] = verdict
                worker.items.popleft()
                worker.item_started = time.monotonic()
        except (EOFError, OSError):
            return False
        return True


def _check_batch(completions: Sequence[str], answers: Sequence[str], grader: str, extract: str,
                 timeout_s: float) -> None:
    _lookup(GRADERS, grader, "grader")
    _lookup(EXTRACTORS, extract, "extract")
    if len(completions) != len(answers):
        raise ValueError(f"grade(): {len(completions)} completions but {len(answers)} answers; "
                         "pass one gold answer per completion (repeat it for k samples)")
    if not timeout_s > 0:
        raise ValueError(f"grade(): timeout_s must be > 0, got {timeout_s}")


_default_pool: GradingPool | None = None


def default_pool(workers: int | None = None) -> GradingPool:
    """The shared pool, sized min(workers or cores, 8); recreated when a different size is asked for."""
    global _default_pool
    size = min(workers or os.cpu_count() or 1, 8)
    if _default_pool is not None and workers and _default_pool.size != size:
        _default_pool.close()
    if _default_pool is None or _default_pool.closed:
        _default_pool = GradingPool(size)
    return _default_pool


@atexit.register
def _close_default_pool() -> None:
    if _default_pool is not None:
        _default_pool.close()


def grade(completions: Sequence[str], answers: Sequence[str], grader: str = "math_verify",
          timeout_s: float = 2.0, extract: str = "boxed", workers: int | None = None) -> list[Verdict]:
    """One `Verdict` per (completion, gold answer) pair, in order. See the module docstring."""
    _check_batch(completions, answers, grader, extract, timeout_s)
    if not completions:
        return []
    if grader not in POOLED_GRADERS:
        return [grade_one(c, a, grader, extract, timeout_s)
                for c, a in zip(completions, answers, strict=True)]
    return default_pool(workers).grade(completions, answers, grader, extract, timeout_s)


# ------------------------------------------------------------------------------------------------ metrics


def disagreement(verdicts_a: Sequence[Verdict], verdicts_b: Sequence[Verdict]) -> float:
    """Fraction of items on which two graders' scores differ (0.0 for empty input)."""
    if len(verdicts_a) != len(verdicts_b):
        raise ValueError(f"disagreement(): {len(verdicts_a)} vs {len(verdicts_b)} verdicts; grade the same "
                         "items with both graders")
    if not verdicts_a:
        return 0.0
    return sum(a.score != b.score for a, b in zip(verdicts_a, verdicts_b, strict=True)) / len(verdicts_a)


def reward_metrics(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Grading health for the logger: items graded, timeouts and errors (counts), fraction without an
    extractable answer. No score mean: the trainer logs its own reward/mean (with shaping) and reward/acc."""
    n = len(verdicts)
    return {
        "reward/graded": float(n),
        "reward/timeouts": float(sum(v.timeout for v in verdicts)),
        "reward/errors": float(sum(v.error is not None and not v.timeout for v in verdicts)),
        "reward/no_answer_frac": sum(v.extracted is None for v in verdicts) / n if n else 0.0,
    }
