"""Parent of the userpath benchmarks (the fork path as users see it).

    python3 userpath.py MODE KIND [NAME]

KIND hello: the handler returns "hello". KIND groupby: the initialization
builds a 1e6-row pandas frame (1,000 users, an amount each row) and the
handler sums the amounts by user over it, returning a digest.

MODE cold: initialize, run the handler, print RESULT, exit normally.
MODE warm: initialize, print READY, stop itself (SIGSTOP); on SIGCONT run
the handler, print RESULT, exit normally (the keep-alive instance).
MODE forker: initialize, print READY, then loop: stop itself (SIGSTOP); on
SIGCONT fork(2) a child that runs the handler, prints RESULT and exits with
os._exit, wait for it, print DONE (the local-fork baseline).
MODE seed / seed-exit: initialize, prepare itself as seed NAME, print
READY and stop itself; each child runs the handler, prints RESULT and
exits normally (seed) or with mitosis.exit() (seed-exit: no interpreter
teardown).
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mitosis  # noqa: E402

mode, kind = sys.argv[1], sys.argv[2]
if kind == "groupby":
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    n = 1_000_000
    frame = pd.DataFrame({"user": rng.integers(0, 1000, n), "amount": rng.random(n)})

    def handle():
        by = frame.groupby("user")["amount"].sum()
        return "%d:%.6f" % (len(by), by.sum())
else:
    def handle():
        return "hello"

if mode == "cold":
    print("RESULT", handle(), flush=True)
    sys.exit(0)
if mode == "warm":
    print("READY", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    print("RESULT", handle(), flush=True)
    sys.exit(0)
if mode == "forker":
    print("READY", flush=True)
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)
        pid = os.fork()
        if pid == 0:
            print("RESULT", handle(), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("DONE", flush=True)
role = mitosis.prepare(sys.argv[3])
if role.is_parent:
    print("READY", flush=True)
    while True:  # the seed is all it is for now
        os.kill(os.getpid(), signal.SIGSTOP)
print("RESULT", handle(), flush=True)
if mode == "seed-exit":
    mitosis.exit(0)
