#!/usr/bin/python3
"""A multi-threaded Python parent of the mitosis end-to-end tests.

usage: mtparent.py SEED_NAME

Imports numpy, pandas and igraph with their default thread pools: no
OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS (they are removed
from the environment before the imports). Builds its state (two 400x400
integer-valued matrices, a 300k-row DataFrame, a 20k-vertex graph) and a
concurrent.futures pool of 4 Python threads, runs each library and the pool
once so that every pool's threads are started, and prints

    THREADS <n>          the process's thread count at the prepare point

then calls mitosis.prepare(SEED_NAME) (client/python on PYTHONPATH) and, in
both roles, prints

    ROLE parent <seed>   or   ROLE child <child>
    CHECK threads ok     the process has the parent's thread count
    CHECK state ok       the inherited state hashes as before prepare
    DIGEST <sha256 hex>  of a matrix multiply (OpenBLAS, on its pool), a
                         groupby, the graph's components and degrees, and
                         per-key sums computed on the Python thread pool
    DONE

A child exits 0 after DONE; the parent prints DONE after a line (or EOF) on
stdin. Integer-valued matrices make the multiply's result exact, so the
digest does not depend on how OpenBLAS splits the work.
"""
import os
import sys

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS"):
    os.environ.pop(_v, None)

import concurrent.futures  # noqa: E402
import hashlib  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402

import igraph  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import mitosis  # noqa: E402


def ntasks():
    return len(os.listdir("/proc/self/task"))


def build():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 16, (400, 400)).astype(np.float64)
    b = rng.integers(0, 16, (400, 400)).astype(np.float64)
    n = 300_000
    df = pd.DataFrame({"k": rng.integers(0, 97, n), "v": rng.integers(0, 1000, n)})
    g = igraph.Graph.Erdos_Renyi(n=20_000, m=60_000)
    return a, b, df, g


def state_hash(a, b, df, g):
    h = hashlib.sha256()
    h.update(a.tobytes())
    h.update(b.tobytes())
    h.update(pd.util.hash_pandas_object(df, index=True).values.tobytes())
    h.update(np.asarray(g.get_edgelist(), dtype=np.int64).tobytes())
    return h.hexdigest()


def part_sum(df, k):
    return int(df.v[df.k % 4 == k].sum())


def compute(a, b, df, g, pool):
    h = hashlib.sha256()
    parts = list(pool.map(lambda k: part_sum(df, k), range(4)))
    h.update(np.asarray(parts, dtype=np.int64).tobytes())
    c = a @ b
    h.update(c.tobytes())
    s = df.groupby("k")["v"].sum()
    h.update(s.values.astype(np.int64).tobytes())
    h.update(np.asarray(g.components().sizes(), dtype=np.int64).tobytes())
    h.update(np.asarray(g.degree(), dtype=np.int64).tobytes())
    return h.hexdigest()


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "mtparent"
    random.seed(11)  # igraph draws from the random module
    a, b, df, g = build()
    before = state_hash(a, b, df, g)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    # Four tasks that wait for each other start all four pool threads.
    barrier = threading.Barrier(4)
    list(pool.map(lambda _: barrier.wait(10), range(4)))
    compute(a, b, df, g, pool)  # runs every pool
    n = ntasks()
    print("THREADS %d" % n, flush=True)

    r = mitosis.prepare(name)
    if r.role == "child":
        print("ROLE child %s" % r.child, flush=True)
    else:
        print("ROLE parent %s" % r.seed, flush=True)
    now = ntasks()
    if now == n:
        print("CHECK threads ok", flush=True)
    else:
        print("CHECK threads FAIL %d threads, the parent had %d" % (now, n), flush=True)
    if state_hash(a, b, df, g) == before:
        print("CHECK state ok", flush=True)
    else:
        print("CHECK state FAIL the inherited state differs", flush=True)
    print("DIGEST %s" % compute(a, b, df, g, pool), flush=True)
    if r.role != "child":
        sys.stdin.readline()
    print("DONE", flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
