"""CPU one FINRA audit rule costs, three ways, side by side (BENCHMARKS.md,
workflows: what bounds the fork transfer).

Run as root from the repository (bench/finra-rule-cost.sh builds the binaries
and calls this):

    python3 bench/finra-rule-cost.py MITOSIS_BINARY [TRADES] [ROUNDS] [RULES]

One node daemon on a unix socket in a temporary state directory; a seed
process builds the FINRA state (examples/finra: TRADES trades), sheds as the
function runtime does and prepares itself. Then, in ROUNDS interleaved
rounds of RULES rules each (rules 0..3 in turn, one kind each):

  remote fork   every rule is a child forked from the seed (mitosis fork
                --prefetch, as the platform forks an invocation), on a warm
                node page cache: restore, UFFDIO_CONTINUE of what it reads,
                exit;
  fork server   one child forked from the seed forks every rule itself with
                os.fork(): the kernel copies its page tables, no restore and
                no pager per rule (the pager serves only what the child had
                not mapped);
  fork server, private copy
                the same, but the child first copies the state (the frame
                and the market dict) into its own private memory, so its
                rules fork from plain anonymous memory as the bound's do
                (the copy is counted);
  os.fork bound a process on the host that built the same state forks every
                rule: the kernel's fork, no mitosis at all.

CPU per rule is everything it made the machine do: the daemon and the
processes it reaped (the remote and fork-server children), or the bound's
parent and its children, from /proc and getrusage. Prints one table row per
way: median and spread over the rounds.
"""
import ctypes
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples", "finra"))
sys.path.insert(0, os.path.join(HERE, "..", "client", "python"))
import workflow as W  # noqa: E402

TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")


def build(trades):
    inp = {"trades": trades}
    state = (W.fetch_portfolio(inp), W.fetch_market_data(inp))
    gc.collect()
    gc.freeze()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return state


def rule(state, k):
    W.audit({"rule": k % 4}, state[0], state[1])


def serve_rules(state, first, n):
    """Fork n rules one after another with os.fork (the bound and the fork
    server); returns the CPU ms they cost, the forks included."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                rule(state, first + i)
            except BaseException:
                code = 1
            os._exit(code)
        _, st = os.waitpid(pid, 0)
        if st != 0:
            raise SystemExit("rule child failed: status %d" % st)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s1 = resource.getrusage(resource.RUSAGE_SELF)
    return 1000 * (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime +
                   s1.ru_utime - s0.ru_utime + s1.ru_stime - s0.ru_stime)


def seed_main(trades):
    """The seed process: build, prepare; children run what the payload says."""
    import mitosis
    state = build(trades)
    os.closerange(3, 4096)
    role = mitosis.prepare(name="finra-rules")
    if role.is_parent:
        print("SEED", flush=True)
        while True:
            signal.pause()
    p = role.payload or {}
    try:
        if "serve" in p:
            if p.get("private"):
                import copy
                state = (state[0].copy(deep=True), copy.deepcopy(state[1]))
            serve_rules(state, p["first"], p["serve"])
        else:
            rule(state, p["k"])
    except BaseException as e:
        print("child failed:", e, flush=True)
        os._exit(1)
    os._exit(0)


def bound_main(trades, rounds, rules):
    """The bound: build here, then fork rounds of rules; prints ms per rule."""
    state = build(trades)
    print(json.dumps([serve_rules(state, 0, rules) / rules for _ in range(rounds)]), flush=True)


def cpu_ms(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in f[11:15]) * TICK_MS  # utime stime cutime cstime


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--seed":
        return seed_main(int(sys.argv[2]))
    if len(sys.argv) > 1 and sys.argv[1] == "--bound":
        return bound_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    mitosis = sys.argv[1]
    trades = int(sys.argv[2]) if len(sys.argv) > 2 else 4000000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    rules = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    work = tempfile.mkdtemp(prefix="mitosis-rules.")
    sock = os.path.join(work, "s.sock")
    daemon = seed = None
    try:
        daemon = subprocess.Popen([mitosis, "daemon", "--socket", sock, "--state-dir", os.path.join(work, "st")],
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "d.log"), "w"))
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        env = dict(os.environ, MITOSIS_SOCKET=sock)
        seed = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--seed", str(trades)],
                                stdout=subprocess.PIPE, env=env, text=True)
        if seed.stdout.readline().strip() != "SEED":
            raise SystemExit("the seed process did not prepare; see %s/d.log" % work)

        def fork(payload, prefetch=True):
            args = [mitosis, "--socket", sock, "fork", "finra-rules", "--payload", json.dumps(payload)]
            if prefetch:
                args.insert(4, "--prefetch")
            subprocess.run(args, check=True, stdout=subprocess.DEVNULL)

        # Warm the node's page cache and the seed's working set.
        for k in range(4):
            fork({"k": k}, prefetch=False)
        ways = {"remote fork": [], "fork server": [], "fork server, private copy": [], "os.fork bound": []}
        for _ in range(rounds):
            c0 = cpu_ms(daemon.pid)
            for i in range(rules):
                fork({"k": i})
            ways["remote fork"].append((cpu_ms(daemon.pid) - c0) / rules)
            c0 = cpu_ms(daemon.pid)
            fork({"serve": rules, "first": 0})
            ways["fork server"].append((cpu_ms(daemon.pid) - c0) / rules)
            c0 = cpu_ms(daemon.pid)
            fork({"serve": rules, "first": 0, "private": True})
            ways["fork server, private copy"].append((cpu_ms(daemon.pid) - c0) / rules)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--bound", str(trades), "1", str(rules)],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            ways["os.fork bound"].extend(json.loads(out))
        print("trades %d, %d rounds of %d rules (median, min-max, CPU ms per rule)" % (trades, rounds, rules))
        bound = statistics.median(ways["os.fork bound"])
        for name, v in ways.items():
            m = statistics.median(v)
            print("  %-26s %6.1f  (%5.1f-%5.1f)  x%.2f of the bound" % (name, m, min(v), max(v), m / bound))
    finally:
        if seed is not None:
            seed.kill()
            seed.wait()
        if daemon is not None:
            daemon.send_signal(signal.SIGINT)
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
