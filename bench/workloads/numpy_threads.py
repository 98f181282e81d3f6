"""Parent of the threads benchmark's numpy cases (issue #10).

The benchmark starts it twice: with OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and
MKL_NUM_THREADS removed from its environment (numpy's BLAS starts its default
thread pool) and with OPENBLAS_NUM_THREADS=1 (no pool). It imports numpy,
multiplies two small integer-valued matrices (so the pool has run), prints
READY and loops: stop itself with SIGSTOP; on resuming, a mitosis child (its
pid differs from the one before the stop) writes "x" to fd 1 (what the
benchmark times), then multiplies again on the inherited pool (untimed),
prints "MATMUL ok" if the product equals the parent's ("MATMUL FAIL"
otherwise) and exits. The parent itself, if ever continued, writes "RESUMED"
and stops again (the benchmark fails if it sees that).
"""
import os
import signal

import numpy as np

a = (np.arange(256 * 256, dtype=np.float64).reshape(256, 256) % 7) - 3
b = (np.arange(256 * 256, dtype=np.float64).reshape(256, 256).T % 5) - 2
want = a @ b  # integer-valued: exact however the BLAS splits the work
orig = os.getpid()
print("READY", flush=True)
while True:
    os.kill(orig, signal.SIGSTOP)
    if os.getpid() != orig:
        os.write(1, b"x")
        ok = np.array_equal(a @ b, want)
        os.write(1, b"MATMUL ok\n" if ok else b"MATMUL FAIL\n")
        os._exit(0)
    os.write(1, b"RESUMED\n")
