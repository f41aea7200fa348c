"""The grading pool: worker processes that grade items under a hard per-item wall-clock timeout, the shared
default pool, and `grade()`, the front door that runs pooled graders in it and the others inline.

Two layers. `WorkerPool` forks the workers, times every item and kills and replaces a worker that overruns
or dies. It does not run in the caller's process: `GradingPool` (what callers use) starts one clean host
interpreter, `python -m mtp_occ.rewards.host`, and the `WorkerPool` lives there. So workers never re-import
the caller's `__main__` (spawn and forkserver children do, which breaks a script without a
`if __name__ == "__main__":` guard, a script read from stdin, and re-runs whatever a notebook's or a torch
entry point's main module does at import), grading works from any thread, and workers are forked from a
small single-threaded process that has math-verify imported already: a replacement after a kill starts in
milliseconds. The host grades one batch at a time and dies with its caller (its pipe closes).
"""

from __future__ import annotations

import atexit
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_ready
from pathlib import Path

from mtp_occ.rewards.extract import EXTRACTORS
from mtp_occ.rewards.graders import GRADERS, POOLED_GRADERS, Verdict, _lookup, grade_one

# ------------------------------------------------------------------------------------------- worker side


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _worker_main(conn, memory_limit_bytes: int) -> None:
    """Grade chunks of `(index, grader, completion, answer, extract, timeout_s)`; reply per item. After an
    item that ran out of time (our SIGALRM), reply `("retire", index)` and exit: the alarm may have cut an
    import or a cache fill in half, and a clean replacement forks from the host in milliseconds."""
    import resource

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it kills us
    # no warm-up here: the host ran `warm_up` (no timer) before forking, so every lazy import is inherited
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
            verdict = grade_one(completion, answer, grader, extract, timeout_s)
            conn.send((index, verdict))
            if verdict.timeout:
                conn.send(("retire", index))
                return


# ------------------------------------------------------------------------------------------- parent side


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: object  # multiprocessing Connection
    started: float
    ready: bool = False
    items: deque | None = None  # indices sent and not answered yet, in the order the worker grades them
    item_started: float = 0.0  # when the worker began items[0] (chunk sent, or previous item answered)
    retiring: bool = False  # it timed out an item itself and exits: replace it, re-queue the rest


def _stop(worker: _Worker) -> None:
    worker.process.kill()
    worker.process.join(timeout=5)
    worker.conn.close()


def _stop_all(workers: list[_Worker]) -> None:
    for worker in workers:
        _stop(worker)
    workers.clear()


class WorkerPool:
    """Worker processes grading items with a hard per-item wall-clock timeout (runs inside the host, see
    the module docstring; `fork` is safe there because the host is single-threaded).

    Items go out in chunks (throughput) but are timed one by one: a worker answers each item as it
    finishes, so the parent knows when the next one started. An item running past `timeout_s + grace_s`
    gets its worker killed and replaced and scores 0 with `timeout=True`; the rest of that chunk is
    re-queued. An item that runs out of its budget inside the worker (SIGALRM) also scores 0 with
    `timeout=True`, and that worker is replaced as well (the alarm may have cut an import in half; the rest
    of its chunk is re-queued). A worker that dies (segfault, OOM kill) costs its current item (score 0,
    `error` set).
    Calls from several threads are serialised by a lock.
    """

    def __init__(self, workers: int | None = None, *, memory_limit_gb: float = 4.0, grace_s: float = 1.0,
                 start_method: str = "fork", startup_timeout_s: float = 120.0, max_chunk: int = 16):
        self.size = max(1, workers or os.cpu_count() or 1)
        self.grace_s, self.startup_timeout_s, self.max_chunk = grace_s, startup_timeout_s, max_chunk
        self._memory_limit = int(memory_limit_gb * 2**30)
        self._ctx = mp.get_context(start_method)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)  # also runs at exit

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def start(self) -> WorkerPool:
        """Start every worker and wait until all are ready (optional: `grade()` starts them lazily)."""
        with self._lock:
            self._fill()
            while not all(w.ready for w in self._workers):
                self._collect([], deque(), float("inf"))
        return self

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

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
            raise RuntimeError("grading pool used after close(); create a new pool")
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn, self._memory_limit),
                                    name="mtp_occ-grader", daemon=True)
        process.start()  # the host blocked SLURM's USR1/USR2 before exec; the mask survives fork
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
            drained = self._drain(worker, results)
            if worker.retiring:  # its timed-out item has its verdict; nothing else of the chunk ran
                self._retire(worker, results, pending, None)
            elif not drained or not worker.process.is_alive():
                worker.process.join(timeout=5)
                code = worker.process.exitcode
                if not worker.ready:
                    raise RuntimeError(
                        f"a grading worker died while starting (exit code {code}); its traceback is on "
                        "stderr. Check that `python -c 'import math_verify'` works")
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
                if message[0] == "retire":
                    worker.retiring = True
                    return True
                index, verdict = message
                if not worker.items or worker.items[0] != index:
                    raise RuntimeError(f"grading worker answered item {index}, expected {worker.items}")
                results[index] = verdict
                worker.items.popleft()
                worker.item_started = time.monotonic()
        except (EOFError, OSError):
            return False
        return True


# ------------------------------------------------------------------------------------------- caller side


def _stop_host(host: list) -> int | None:
    """Close a host (`[process, connection]`, emptied in place); returns its exit code."""
    if not host:
        return None
    process, conn = host
    host.clear()
    try:
        conn.send(None)  # a clean shutdown: the host closes its workers
    except OSError:
        pass
    conn.close()
    try:
        return process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class GradingPool:
    """Worker processes grading items with a hard per-item wall-clock timeout, managed by a clean host
    process (see the module docstring); usable from any script, notebook or thread.

    Items go out in chunks (throughput) but are timed one by one: a worker answers each item as it
    finishes, so the host knows when the next one started. An item running past `timeout_s + grace_s`
    gets its worker killed and replaced and scores 0 with `timeout=True`; the rest of that chunk is
    re-queued. An item that runs out of its budget inside the worker (SIGALRM) also scores 0 with
    `timeout=True`, and that worker is replaced as well (the alarm may have cut an import in half; the rest
    of its chunk is re-queued). A worker that dies (segfault, OOM kill) costs its current item (score 0,
    `error` set).
    Workers cap their address space at their size after start-up + `memory_limit_gb`. Calls from several
    threads are serialised by a lock. If the host itself dies (the OOM killer), the call starts a new one
    and retries once; Ctrl-C during a call drops the host (its late reply must not answer the next call).
    """

    def __init__(self, workers: int | None = None, *, memory_limit_gb: float = 4.0, grace_s: float = 1.0,
                 startup_timeout_s: float = 120.0, max_chunk: int = 16):
        self.size = max(1, workers or os.cpu_count() or 1)
        self.startup_timeout_s = startup_timeout_s
        self._options = {"workers": self.size, "memory_limit_gb": memory_limit_gb, "grace_s": grace_s,
                         "startup_timeout_s": startup_timeout_s, "max_chunk": max_chunk}
        self._host: list = []  # [Popen, Connection] while a host runs; a list so the finalizer sees it
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_host, self._host)  # also runs at exit

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
        """Start the host and every worker and wait until all are ready (optional: `grade()` is lazy)."""
        self._call("start")
        return self

    def worker_pids(self) -> list[int]:
        """The workers' process ids (they change when a worker is replaced)."""
        return self._call("pids")

    def grade(self, completions: Sequence[str], answers: Sequence[str], grader: str = "math_verify",
              extract: str = "boxed", timeout_s: float = 2.0) -> list[Verdict]:
        """One `Verdict` per (completion, gold answer) pair, in order."""
        _check_batch(completions, answers, grader, extract, timeout_s)
        if not completions:
            return []
        return self._call("grade", list(completions), list(answers), grader, extract, timeout_s)

    def _call(self, *request):
        with self._lock:
            if self.closed:
                raise RuntimeError("GradingPool used after close(); create a new pool")
            for attempt in range(2):
                conn = self._ensure_host()
                try:
                    conn.send(request)
                    status, value = conn.recv()
                except (EOFError, OSError):  # the host died: start a new one and retry once
                    code = _stop_host(self._host)
                    if attempt:
                        raise RuntimeError(f"the grading host died twice during one call (exit code {code}; "
                                           "negative = killed by that signal); see stderr") from None
                    continue
                except BaseException:
                    _stop_host(self._host)
                    raise
                if status == "error":
                    raise RuntimeError(value)
                return value

    def _ensure_host(self) -> Connection:
        if self._host:
            return self._host[1]
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        from mtp_occ.preempt import shield_children

        with shield_children():  # SLURM signals every process of the step: USR2 would kill the host
            process = subprocess.Popen(
                [sys.executable, "-m", "mtp_occ.rewards.host", str(theirs.fileno()), json.dumps(self._options)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        conn = Connection(ours.detach())
        self._host.extend([process, conn])
        ready = conn.poll(self.startup_timeout_s)
        try:
            message = conn.recv() if ready else None
        except (EOFError, OSError):
            message = None
        if not (isinstance(message, tuple) and message[0] == "ready"):
            code = _stop_host(self._host)
            why = f"died while starting (exit code {code})" if ready else \
                f"did not start within {self.startup_timeout_s:g} s"
            raise RuntimeError(f"the grading host {why}; its traceback is on stderr. Check that "
                               "`python -m mtp_occ.rewards.host` can import math_verify in a fresh interpreter")
        return conn


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
    """One `Verdict` per (completion, gold answer) pair, in order. See the `mtp_occ.rewards` docstring."""
    _check_batch(completions, answers, grader, extract, timeout_s)
    if not completions:
        return []
    if grader not in POOLED_GRADERS:
        return [grade_one(c, a, grader, extract, timeout_s)
                for c, a in zip(completions, answers, strict=True)]
    return default_pool(workers).grade(completions, answers, grader, extract, timeout_s)
