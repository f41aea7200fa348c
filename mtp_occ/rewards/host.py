"""The grading host: a clean interpreter that owns the `WorkerPool` for one `GradingPool`.

Started by `GradingPool` as `python -m mtp_occ.rewards.host FD OPTIONS_JSON`, with one end of a socket pair
as FD. It imports math-verify (so forked workers start warm), answers `("ready", pid)`, then serves requests
`(op, *args)` one at a time with `("ok", value)` or `("error", message)`, and exits when the caller sends
None or its end closes (the caller died). Ctrl-C is the caller's business (SIGINT ignored); SLURM's
USR1/USR2 arrive blocked (see `mtp_occ.preempt.shield_children`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from multiprocessing.connection import Connection


def serve(conn: Connection, options: dict) -> None:
    from mtp_occ.rewards.graders import warm_up
    from mtp_occ.rewards.pool import WorkerPool

    warm_up()  # import + warm math-verify once, with no timer running; workers inherit it
    # A forked worker must not keep the caller's socket open: if the host is killed, the caller has to see
    # EOF at once (and not wait on a worker that holds a copy of the host's end).
    os.register_at_fork(after_in_child=conn.close)
    pool = WorkerPool(**options)
    ops = {"grade": pool.grade, "start": lambda: len(pool.start().worker_pids()), "pids": pool.worker_pids}
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):  # the caller is gone
                return
            if request is None:
                return
            op, *args = request
            try:
                reply = ("ok", ops[op](*args))
            except Exception as e:  # the caller raises it; the host lives on
                reply = ("error", f"{type(e).__name__}: {e}")
            conn.send(reply)
    finally:
        pool.close()


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, options = int(argv[0]), json.loads(argv[1])
    serve(Connection(fd), options)


if __name__ == "__main__":
    main(sys.argv[1:])
