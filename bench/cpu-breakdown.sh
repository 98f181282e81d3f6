#!/usr/bin/env bash
# Where a forked invocation's CPU goes (BENCHMARKS.md, platform section).
# As root: a gateway (embedded etcd, no auth) and one node daemon on
# loopback, FUNCTION_DIR (default bench/platform/hello) deployed under the
# fork policy with a 256Mi memory limit, then hey -n N -c C against it while
# the daemon's CPU is profiled (Go pprof on its --metrics address) and the
# CPU of the gateway, the daemon and the daemon's reaped children (the
# restored function processes) is read from /proc.
#
#   bash bench/cpu-breakdown.sh [FUNCTION_DIR] [N] [C]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
fn=$(realpath "${1:-bench/platform/hello}") n=${2:-3000} c=${3:-16}
w=$(mktemp -d /tmp/mitosis-cpu.XXXXXX)
gw= d=
cleanup() {
  [ -n "$gw" ] && kill "$gw" 2>/dev/null && wait "$gw" 2>/dev/null || true
  [ -n "$d" ] && kill "$d" 2>/dev/null && wait "$d" 2>/dev/null || true
  rm -rf "$w"
}
trap cleanup EXIT
CGO_ENABLED=0 go build -o "$w/" ./cmd/mitosis ./cmd/mitosisd
head -c 32 /dev/urandom | base64 >"$w/secret"
"$w/mitosis" gateway --listen 127.0.0.1:18080 --state-dir "$w/gw" --secret-file "$w/secret" --no-auth \
  --etcd-listen http://127.0.0.1:12379 --etcd-peer-listen http://127.0.0.1:12380 2>"$w/gw.log" &
gw=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/healthz >/dev/null && break; sleep 0.05; done
"$w/mitosis" daemon --node a --listen 127.0.0.1:17070 --secret-file "$w/secret" --etcd-endpoints http://127.0.0.1:12379 \
  --socket "$w/s.sock" --state-dir "$w/st" --metrics 127.0.0.1:19090 2>"$w/d.log" &
d=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/system/nodes | grep -q '"a"' && break; sleep 0.05; done
curl -sf -d "{\"service\":\"f\",\"image\":\"$fn\",\"limits\":{\"memory\":\"256Mi\"}}" http://127.0.0.1:18080/system/functions >/dev/null
for _ in 1 2 3 4 5; do curl -sf -d x http://127.0.0.1:18080/function/f >/dev/null; done
ticks() { awk '{print $14, $15, $16, $17}' "/proc/$1/stat"; }
read -r g0u g0s _ _ < <(ticks "$gw"); read -r d0u d0s d0cu d0cs < <(ticks "$d")
t0=$(date +%s%N)
curl -s -o "$w/cpu.pprof" "http://127.0.0.1:19090/debug/pprof/profile?seconds=5" &
prof=$!
hey -n "$n" -c "$c" -m POST -d x http://127.0.0.1:18080/function/f >"$w/hey.txt"
secs=$(( ($(date +%s%N) - t0) / 1000000 ))
read -r g1u g1s _ _ < <(ticks "$gw"); read -r d1u d1s d1cu d1cs < <(ticks "$d")
wait "$prof" || true
hz=$(getconf CLK_TCK)
per() { awk -v t="$1" -v n="$n" -v hz="$hz" 'BEGIN { printf "%.2f", t * 1000 / hz / n }'; }
grep -E "Requests/sec| 50% in| 99% in" "$w/hey.txt"
echo "CPU ms per request (over $n requests, ${secs} ms):"
echo "  gateway           user $(per $((g1u - g0u)))  kernel $(per $((g1s - g0s)))"
echo "  daemon            user $(per $((d1u - d0u)))  kernel $(per $((d1s - d0s)))"
echo "  function children user $(per $((d1cu - d0cu)))  kernel $(per $((d1cs - d0cs)))"
echo "daemon profile (5 s during the run), top by cumulative time:"
go tool pprof -top -cum -nodecount=25 "$w/mitosis" "$w/cpu.pprof" 2>/dev/null | sed -n '/flat%/,$p' |
  grep -E "restore\.\(\*child\)\.build|uffd\.Continue|container\.|transport\.\(\*serverConn\)\.invoke|Pool|reap" || true
