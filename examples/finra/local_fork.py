"""The bound for any fork-based state transfer of the FINRA workflow on
this host: one process runs the source steps, sheds as the function runtime
does before it prepares (gc.collect, gc.freeze, malloc_trim), then
os.fork()s one child per rule, all at once; each child runs its rule on the
state it inherited and writes its verdict to a pipe, and the parent merges
them. No platform, no network, no restore, no paging: the kernel's own fork
of a process that is already there, which a remote fork can approach but not
beat. The interpreter's start and imports are not timed (the platform's
workflow function has them done in its seed too).

Usage: local_fork.py '{"trades": N, "rules": M, "window": W}'
Prints one JSON line: ms (end to end), sources_ms, audit_ms, digest.
"""
import ctypes
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workflow as W  # noqa: E402


def main():
    inp = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    portfolio = W.fetch_portfolio(inp)
    market = W.fetch_market_data(inp)
    rules = W.list_rules(inp)
    gc.collect()
    gc.freeze()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    t1 = time.perf_counter()
    kids = []
    for rule in rules:
        rd, wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rd)
            code = 0
            try:
                out = json.dumps(W.audit(rule, portfolio, market)).encode()
                while out:
                    out = out[os.write(wr, out):]
            except BaseException:
                code = 1
            os._exit(code)
        os.close(wr)
        kids.append((pid, rd))
    verdicts = []
    for pid, rd in kids:
        chunks = []
        while True:
            b = os.read(rd, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(rd)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            sys.exit("rule child %d failed (status %d)" % (pid, status))
        verdicts.append(json.loads(b"".join(chunks)))
    t2 = time.perf_counter()
    merged = W.merge(verdicts)
    t3 = time.perf_counter()
    print(json.dumps({"ms": (t3 - t0) * 1000, "sources_ms": (t1 - t0) * 1000,
                      "audit_ms": (t2 - t1) * 1000, "digest": merged["digest"]}))


if __name__ == "__main__":
    main()
