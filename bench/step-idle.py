"""How busy the machine's CPUs were during each workflow run's audit step
(BENCHMARKS.md, workflows: why the stage seed's audit step is slower).

    python3 bench/step-idle.py RUNS_OUT -- COMMAND...

runs COMMAND (a mitosis-workflow-bench invocation given -runs-out RUNS_OUT)
while sampling the first line of /proc/stat every 50 ms, then prints, for
every run in RUNS_OUT, its way, its audit step's length and the share of
that step the CPUs spent idle, in user and in system time. The step is
placed by its start in the run record (at_ms). Example:

    python3 bench/step-idle.py /tmp/runs.jsonl -- go run ./cmd/mitosis-workflow-bench \\
        -rules 32 -trades 4000000 -runs 3 -fork-seeds stage,per-run -bound=false -runs-out /tmp/runs.jsonl
"""
import bisect
import datetime
import json
import subprocess
import sys
import threading
import time


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    runs_out, cmd = sys.argv[1], sys.argv[3:]
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            with open("/proc/stat") as f:
                fields = f.readline().split()[1:9]
            samples.append((time.time(), [int(x) for x in fields]))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        code = subprocess.call(cmd)
    finally:
        stop.set()
        t.join()
    if code != 0:
        raise SystemExit("%s exited %d" % (cmd[0], code))
    times = [s[0] for s in samples]
    for line in open(runs_out):
        r = json.loads(line)
        start = datetime.datetime.fromisoformat(r["started"].replace("Z", "+00:00")).timestamp()
        audit = [st for st in r["steps"] if st["name"] == "audit"]
        if not audit or "at_ms" not in audit[0]:
            continue  # a record from before steps carried their start (at_ms)
        st = audit[0]
        t0 = start + st["at_ms"] / 1000
        t1 = t0 + st["ms"] / 1000
        i, j = bisect.bisect_left(times, t0), bisect.bisect_left(times, t1) - 1
        if j <= i:
            continue
        d = [b - a for a, b in zip(samples[i][1], samples[j][1])]
        total = sum(d) or 1
        way = r["transfer"] if r["transfer"] != "fork" else ("fork (per-run seed)" if r["deploy_ms"] > 5 else "fork (stage seed)")
        # /proc/stat: user nice system idle iowait irq softirq steal
        print("%-20s audit %6.0f ms  idle %3.0f%%  user %3.0f%%  system %3.0f%%" % (
            way, st["ms"], 100 * d[3] / total, 100 * (d[0] + d[1]) / total, 100 * (d[2] + d[5] + d[6]) / total))


if __name__ == "__main__":
    main()
