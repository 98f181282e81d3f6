#!/usr/bin/python3
"""The Python parent of the multi-node test (test/cluster).

usage: seed.py NAME ARRAY_MIB PANDAS(0|1) [POOL_THREADS]

Builds a dict of 120k entries, a numpy array of ARRAY_MIB MiB and (with
PANDAS=1) a 1e6-row pandas DataFrame, and with POOL_THREADS > 0 starts a
concurrent.futures pool of that many threads (every thread started), then
calls mitosis.prepare(NAME) (client/python on PYTHONPATH, the daemon on
$MITOSIS_SOCKET). Lines:

    ROLE parent <seed> | ROLE child <child>
    DIGEST <sha256 of the dict, the array and the frame>
    POOL <threads> <sums>   (with a pool: the process's thread count and
                             per-quarter sums of the array computed on the
                             pool; the parent prints it after DIGEST)

The parent then sleeps until it is killed. A child acts on its payload:

    {}                  print DIGEST and exit 0
    {"pool": true}      print POOL (computed on the inherited pool), DIGEST,
                        exit 0
    {"hop": true}       add a key to the dict, print HOP <digest>, stop
                        itself with SIGSTOP (to be prepared with
                        `mitosis prepare --pid`); whatever resumes after the
                        stop (a grandchild forked from that seed) prints
                        RESUMED <pid changed> and AFTER <digest>, exits 0
    {"walk": PATH}      print READY, wait for PATH to exist, then read the
                        array page by page slowly (about 1 s for 200 MiB),
                        print WALKED and DIGEST, exit 0
"""
import os
import sys

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import hashlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import mitosis  # noqa: E402

name = sys.argv[1]
mib = int(sys.argv[2])
use_pandas = sys.argv[3] == "1"
pool_threads = int(sys.argv[4]) if len(sys.argv) > 4 else 0

d = {"key-%06d" % i: (i * 2654435761) % 4294967296 for i in range(120_000)}
arr = np.random.default_rng(12345).random(mib * (1 << 20) // 8)
df = None
if use_pandas:
    import pandas as pd

    rng = np.random.default_rng(7)
    cats = ["cat-%02d" % i for i in range(50)]
    df = pd.DataFrame(
        {
            "a": np.arange(1_000_000, dtype=np.int64),
            "b": rng.standard_normal(1_000_000),
            "c": pd.Categorical.from_codes(rng.integers(0, len(cats), 1_000_000), categories=cats),
        }
    )


def digest():
    h = hashlib.sha256()
    h.update("\n".join("%s=%d" % kv for kv in sorted(d.items())).encode())
    h.update(memoryview(arr).cast("B"))
    if df is not None:
        h.update(pd.util.hash_pandas_object(df, index=True).values.tobytes())
    return h.hexdigest()


pool = None
if pool_threads > 0:
    import concurrent.futures
    import threading

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=pool_threads)
    barrier = threading.Barrier(pool_threads)
    list(pool.map(lambda _: barrier.wait(10), range(pool_threads)))


def pool_line():
    q = len(arr) // 4
    sums = pool.map(lambda i: repr(float(arr[i * q : (i + 1) * q].sum())), range(4))
    return "POOL %d %s" % (len(os.listdir("/proc/self/task")), ",".join(sums))


want = digest()
sys.stdout.flush()
r = mitosis.prepare(name)
if r.is_parent:
    print("ROLE parent %s" % r.seed, flush=True)
    print("DIGEST %s" % want, flush=True)
    if pool is not None:
        print(pool_line(), flush=True)
    while True:
        time.sleep(3600)

p = r.payload or {}
print("ROLE child %s" % r.child, flush=True)
if p.get("pool"):
    print(pool_line(), flush=True)
if p.get("hop"):
    d["hop-key"] = 42
    print("HOP %s" % digest(), flush=True)
    me = os.getpid()
    os.kill(me, signal.SIGSTOP)
    print("RESUMED %s" % (os.getpid() != me), flush=True)
    print("AFTER %s" % digest(), flush=True)
    sys.exit(0)
if p.get("walk"):
    print("READY", flush=True)
    while not os.path.exists(p["walk"]):
        time.sleep(0.005)
    step = 4096 // 8
    chunk = step * 64  # 64 pages, then a short sleep
    s = 0.0
    for i in range(0, len(arr), chunk):
        s += float(arr[i : i + chunk : step].sum())
        time.sleep(0.001)
    print("WALKED %r" % s, flush=True)
print("DIGEST %s" % digest(), flush=True)
sys.exit(0)
