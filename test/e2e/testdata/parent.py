#!/usr/bin/python3
"""The Python parent of the mitosis end-to-end tests.

usage: parent.py SEED_NAME [stdin|signal]

Builds a dict of 200k entries, a 68 MB numpy array and a 1e6-row pandas
DataFrame, installs a SIGUSR1 handler, then calls mitosis.prepare(SEED_NAME)
(client/python on PYTHONPATH). It prints, one per line:

    ROLE parent <seed>   or   ROLE child <child>
    PAYLOAD <json>       (children: the fork's --payload, compact, sorted keys)
    DIGEST <sha256 hex>  of the dict, the array and the frame

A child then runs its checks (CHECK <name> ok | CHECK <name> FAIL <detail>),
prints "DONE <failures>" and exits 0. The parent waits for a line (or EOF) on
stdin, or for SIGUSR1 with "signal", runs the same checks and prints DONE.

numpy's OpenBLAS must not start worker threads (mitosis refuses
multi-threaded parents): the *_NUM_THREADS variables are forced to 1 before
numpy is imported.
"""
import os
import sys

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import mitosis  # noqa: E402

N_DICT = 200_000
N_ARRAY = 8_500_000  # float64: 68 MB
N_ROWS = 1_000_000

usr1 = [0]


def on_usr1(signum, frame):
    usr1[0] += 1


def build():
    d = {"key-%06d" % i: (i * 2654435761) % 4294967296 for i in range(N_DICT)}
    rng = np.random.default_rng(12345)
    arr = rng.random(N_ARRAY)
    cats = ["cat-%02d" % i for i in range(50)]
    df = pd.DataFrame(
        {
            "a": np.arange(N_ROWS, dtype=np.int64),
            "b": rng.standard_normal(N_ROWS),
            "c": pd.Categorical.from_codes(rng.integers(0, len(cats), N_ROWS), categories=cats),
        }
    )
    return d, arr, df


def digest(d, arr, df):
    h = hashlib.sha256()
    h.update("\n".join("%s=%d" % kv for kv in sorted(d.items())).encode())
    h.update(memoryview(arr).cast("B"))
    h.update(pd.util.hash_pandas_object(df, index=True).values.tobytes())
    return h.hexdigest()


def role_of(r, name):
    """Accepts what mitosis.prepare may return: an object or namedtuple with
    .role/.seed/.child, a dict, a (role, id, ...) tuple or a plain string."""
    role = seed = child = None
    if isinstance(r, dict):
        role, seed, child = r.get("role"), r.get("seed"), r.get("child")
    elif isinstance(r, str):
        role = r
    elif hasattr(r, "role"):
        role, seed, child = getattr(r, "role", None), getattr(r, "seed", None), getattr(r, "child", None)
    elif isinstance(r, (tuple, list)) and r:
        role = r[0]
        if len(r) > 1:
            seed = child = r[1]
    role = str(getattr(role, "value", role)).lower()
    if "child" in role:
        return "child", str(child or "?")
    if "parent" in role:
        return "parent", str(seed or name)
    return "unknown(%r)" % (r,), "?"


def run_checks(is_child, parent_pid, arr, arr_digest, d, t_prepare):
    failed = 0

    def ok(name):
        print("CHECK %s ok" % name, flush=True)

    def fail(name, detail):
        nonlocal failed
        failed += 1
        print("CHECK %s FAIL %s" % (name, detail), flush=True)

    # pid
    me = os.getpid()
    if is_child and me == parent_pid:
        fail("pid", "child has the parent's pid %d" % me)
    else:
        ok("pid")

    # fork: a grandchild checks the inherited state and exits 0
    try:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if hashlib.sha256(memoryview(arr).cast("B")).hexdigest() != arr_digest:
                    code |= 1
                if d.get("key-000123") != (123 * 2654435761) % 4294967296 or len(d) != N_DICT:
                    code |= 2
            except BaseException:
                code |= 4
            os._exit(code)
        _, st = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(st)
        if code == 0:
            ok("fork")
        else:
            fail("fork", "grandchild exit %d (1=array, 2=dict, 4=exception, <0 signal)" % code)
    except Exception as e:  # noqa: BLE001
        fail("fork", repr(e))

    # subprocess
    try:
        rc = subprocess.run(["/bin/true"], timeout=20).returncode
        if rc == 0:
            ok("subprocess")
        else:
            fail("subprocess", "/bin/true exited %d" % rc)
    except Exception as e:  # noqa: BLE001
        fail("subprocess", repr(e))

    # clocks
    t1 = time.monotonic()
    time.sleep(0.01)
    t2 = time.monotonic()
    now = time.time()
    if not t2 > t1:
        fail("monotonic", "time.monotonic not increasing: %r then %r" % (t1, t2))
    elif t2 - t1 > 5:
        fail("monotonic", "time.monotonic jumped %.3fs over a 10ms sleep" % (t2 - t1))
    elif now < t_prepare - 5:
        fail("monotonic", "time.time %r is before the prepare time %r" % (now, t_prepare))
    else:
        ok("monotonic")

    # signal handler installed before prepare
    usr1[0] = 0
    handler = signal.getsignal(signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.monotonic() + 2
    while usr1[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    if handler is not on_usr1:
        fail("signal", "SIGUSR1 handler is %r" % (handler,))
    elif usr1[0] == 0:
        fail("signal", "SIGUSR1 handler did not run after os.kill")
    else:
        ok("signal")

    # a new thread reads inherited memory
    res = {}

    def work():
        res["sum"] = float(arr[::4096].sum())

    th = threading.Thread(target=work)
    th.start()
    th.join(20)
    want = float(arr[::4096].sum())
    if th.is_alive():
        fail("thread", "thread did not finish in 20 s")
    elif res.get("sum") != want:
        fail("thread", "thread computed %r, want %r" % (res.get("sum"), want))
    else:
        ok("thread")
    return failed


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "pytest"
    wait = sys.argv[2] if len(sys.argv) > 2 else "stdin"

    d, arr, df = build()
    arr_digest = hashlib.sha256(memoryview(arr).cast("B")).hexdigest()
    signal.signal(signal.SIGUSR1, on_usr1)
    parent_pid = os.getpid()
    if threading.active_count() != 1:
        print("WARN %d python threads before prepare" % threading.active_count(), flush=True)
    t_prepare = time.time()
    sys.stdout.flush()
    sys.stderr.flush()

    r = mitosis.prepare(name)

    role, ident = role_of(r, name)
    print("ROLE %s %s" % (role, ident), flush=True)
    if role == "child":
        payload = r.get("payload") if isinstance(r, dict) else getattr(r, "payload", None)
        print("PAYLOAD %s" % json.dumps(payload, sort_keys=True, separators=(",", ":")), flush=True)
    print("DIGEST %s" % digest(d, arr, df), flush=True)
    if role == "child":
        failed = run_checks(True, parent_pid, arr, arr_digest, d, t_prepare)
        print("DONE %d" % failed, flush=True)
        return 0
    if role != "parent":
        print("ERROR unexpected role", flush=True)
        return 3

    # parent: keep running while the children run
    if wait == "signal":
        deadline = time.monotonic() + 300
        while usr1[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        rd, _, _ = select.select([sys.stdin], [], [], 300)
        if rd:
            sys.stdin.readline()
    failed = run_checks(False, parent_pid, arr, arr_digest, d, t_prepare)
    print("FINAL %s" % digest(d, arr, df), flush=True)
    print("DONE %d" % failed, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
