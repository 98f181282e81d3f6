#!/usr/bin/env bash
# The mitosis demo: prepare a Python function (numpy + pandas + a 1e6-row
# frame) once, fork children from it, and compare their start latency with
# a cold start of the same program; then the same kind of function served
# through the gateway (demo/platform.sh): a burst of requests under fork
# and under keep-alive, and a workflow whose steps inherit their upstream's
# memory against one that pickles it through Redis. Needs root (ptrace,
# userfaultfd).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
if [ "$(id -u)" != 0 ]; then echo "demo: run as root (mitosis uses ptrace and userfaultfd)" >&2; exit 1; fi
if ! /usr/bin/python3 -c 'import numpy, pandas' 2>/dev/null; then
  echo "demo: installing python3-numpy python3-pandas" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-numpy python3-pandas >/dev/null
fi
# Inherited descriptors (a CI runner's pipes) would be refused at prepare:
# mitosis cannot carry pipes. Close everything above stderr.
for fd in $(ls /proc/$$/fd); do
  if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
work=$(mktemp -d /tmp/mitosis-demo.XXXXXX)
daemon_pid= parent_pid=
cleanup() {
  [ -n "$parent_pid" ] && kill -9 "$parent_pid" 2>/dev/null || true
  [ -n "$daemon_pid" ] && kill -INT "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
CGO_ENABLED=0 go build -o "$work/" ./cmd/mitosis ./cmd/mitosisd
export MITOSIS_SOCKET=$work/mitosis.sock MITOSIS_STATE_DIR=$work/state
# One BLAS thread: multi-threaded parents fork too, but each extra thread
# adds to every child's start.
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$work/mitosis" daemon 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$MITOSIS_SOCKET" ] && break; sleep 0.05; done

echo "== cold start of demo/app.py (exec, imports, data load, handler)"
for i in 1 2 3; do
  /usr/bin/python3 demo/app.py --cold "$(date +%s.%N)" </dev/null
done

echo "== prepare: start the parent once; it initializes, then calls mitosis.prepare()"
/usr/bin/python3 demo/app.py </dev/null >"$work/parent.out" 2>"$work/parent.err" 3>&- &
parent_pid=$!
for _ in $(seq 600); do grep -q PREPARED "$work/parent.out" 2>/dev/null && break; sleep 0.05; done
cat "$work/parent.err"
grep -q PREPARED "$work/parent.out" || { echo "demo: the parent did not prepare (see above)" >&2; exit 1; }
"$work/mitosis" seeds

echo "== fork: 8 children of the seed, each runs the handler on the inherited frame"
for i in $(seq 8); do
  "$work/mitosis" fork demo --payload "{\"t0\": $(date +%s.%N), \"users\": [$i, $((i+1)), $((i+2))]}" </dev/null
done
echo "== mitosis ps (START = daemon-side restore until the child runs)"
"$work/mitosis" ps
echo "(start_ms of a fork includes the 'mitosis fork' CLI start-up; cold start_ms is exec + imports + data load)"

# Stop this half's daemon and parent before the platform half starts its own.
cleanup
trap - EXIT
echo
echo "== the platform: the gateway in front of a node, a pandas function under fork and keep-alive, a workflow"
exec bash demo/platform.sh
