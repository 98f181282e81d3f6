"""Driver of every suite workload (suite/workloads/wl_NAME.py).

usage: runner.py NAME[:ARG] cold|parent

A workload module defines init(arg) -> state (its import/initialisation
phase: everything before the prepare point) and handler(state) -> bytes (the
request). serve() writes "S\\n" as the instance's first act when a request
reaches it, runs the handler and writes "R <sha256 of its output> <handler
ns>\\n"; then, if the file $SUITE_HOLD exists, the instance stops itself
(SIGSTOP) so its memory can be measured, else it exits.

cold:   import + init + serve (a cold start).
parent: import + init, print READY, then loop stopping itself with SIGSTOP
        (the prepare point). A process that resumes with another pid is a
        mitosis child of this parent and serves one request. The parent itself,
        continued with SIGCONT, reads one command from the file $SUITE_CTL:
          fork      fork a child that serves (local-fork baseline), wait for it
          warm N    fork N children that stop themselves before serving (warm
                    instances; SIGCONT one to serve a request), print "W pids"
          reap      wait for every warm child (they exited or were killed),
                    print "D"
Numeric libraries run single-threaded (OPENBLAS_NUM_THREADS=1 etc.), so that
every policy of the suite measures the same work.
"""
import hashlib
import importlib
import os
import signal
import sys
import time

name, mode = sys.argv[1], sys.argv[2]
arg = None
if ":" in name:
    name, arg = name.split(":", 1)
HOLD = os.environ.get("SUITE_HOLD", "")
CTL = os.environ.get("SUITE_CTL", "")

mod = importlib.import_module("wl_" + name)
state = mod.init(arg)


def serve():
    os.write(1, b"S\n")
    t = time.perf_counter_ns()
    out = mod.handler(state)
    dt = time.perf_counter_ns() - t
    os.write(1, b"R %s %d\n" % (hashlib.sha256(out).hexdigest().encode(), dt))
    if HOLD and os.path.exists(HOLD):
        os.kill(os.getpid(), signal.SIGSTOP)


if mode == "cold":
    serve()
    os._exit(0)

orig = os.getpid()
warm = []
print("READY", flush=True)
while True:
    os.kill(orig, signal.SIGSTOP)
    if os.getpid() != orig:
        serve()
        os._exit(0)
    with open(CTL) as f:
        cmd = f.read().split()
    if cmd[0] == "fork":
        pid = os.fork()
        if pid == 0:
            serve()
            os._exit(0)
        os.waitpid(pid, 0)
    elif cmd[0] == "warm":
        pids = []
        for _ in range(int(cmd[1])):
            pid = os.fork()
            if pid == 0:
                os.kill(os.getpid(), signal.SIGSTOP)
                serve()
                os._exit(0)
            pids.append(pid)
        warm.extend(pids)
        os.write(1, ("W " + " ".join(str(p) for p in pids) + "\n").encode())
    elif cmd[0] == "reap":
        for p in warm:
            os.waitpid(p, 0)
        warm = []
        os.write(1, b"D\n")
    else:
        os.write(2, b"runner.py: unknown command %r\n" % (cmd,))
