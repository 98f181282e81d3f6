"""Parent of the array64-numpy benchmark.

usage: numpy_array.py          the parent (same loop as hello.py, but the
                               child's work is summing the array)
       numpy_array.py once     exec-from-scratch baseline

The array is np.arange(8 << 20, dtype=np.float64) (64 MiB); work() writes
"SUM <int(float(a.sum()))>\\n" to fd 1. numpy must stay single-threaded:
OPENBLAS_NUM_THREADS=1 etc. are expected in the environment.
"""
import os
import signal
import sys

import numpy as np


def work(a):
    s = float(a.sum())
    os.write(1, b"SUM %d\n" % int(s))


a = np.arange(8 << 20, dtype=np.float64)
if len(sys.argv) > 1 and sys.argv[1] == "once":
    work(a)
    sys.exit(0)

orig = os.getpid()
print("READY", flush=True)
while True:
    os.kill(orig, signal.SIGSTOP)
    if os.getpid() != orig:
        work(a)
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        work(a)
        os._exit(0)
    os.waitpid(pid, 0)
