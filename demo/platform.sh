#!/usr/bin/env bash
# The platform half of the demo (demo/run.sh runs it last; it also runs on
# its own, as root): a node daemon and the gateway (with its embedded etcd)
# on this host, the pandas function of demo/fn deployed twice, under the
# fork policy (one seed, every request a forked child) and under
# keep-alive (warm instances kept for 10 minutes, the common platform
# default), then the same burst from hey against both: latency
# percentiles, and the memory each policy holds once the burst is over.
# Last, a workflow through the same gateway (examples/finra): audit rules
# forked from the steps that loaded the trades, against the same rules
# unpickling the trades from a Redis server.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
if [ "$(id -u)" != 0 ]; then echo "demo: run as root (mitosis uses ptrace and userfaultfd)" >&2; exit 1; fi
need=()
command -v curl >/dev/null || need+=(curl)
command -v hey >/dev/null || need+=(hey)
command -v redis-server >/dev/null || need+=(redis-server)
/usr/bin/python3 -c 'import redis' 2>/dev/null || need+=(python3-redis)
/usr/bin/python3 -c 'import numpy, pandas' 2>/dev/null || need+=(python3-numpy python3-pandas)
if [ ${#need[@]} -gt 0 ]; then
  echo "demo: installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
work=$(mktemp -d /tmp/mitosis-platform-demo.XXXXXX)
daemon_pid= gateway_pid= redis_pid=
cleanup() {
  [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null && wait "$gateway_pid" 2>/dev/null || true
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null && wait "$redis_pid" 2>/dev/null || true
  [ -n "$daemon_pid" ] && kill -INT "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
CGO_ENABLED=0 go build -o "$work/" ./cmd/mitosis ./cmd/mitosisd
m=$work/mitosis
head -c 32 /dev/urandom | base64 >"$work/secret"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gw=127.0.0.1:$(port) etcd=http://127.0.0.1:$(port) etcd_peer=http://127.0.0.1:$(port)

echo "== gateway (embedded etcd), one node daemon, and a Redis server for the workflow's storage baseline"
redis-server --port 0 --unixsocket "$work/redis.sock" --unixsocketperm 777 --save "" --appendonly no \
  --dir "$work" --proto-max-bulk-len 2gb >"$work/redis.log" 2>&1 &
redis_pid=$!
"$m" gateway --listen "$gw" --state-dir "$work/gateway" --secret-file "$work/secret" \
  --etcd-listen "$etcd" --etcd-peer-listen "$etcd_peer" \
  --workflow-redis-socket "$work/redis.sock" --workflow-work-dir "$work" 2>"$work/gateway.log" &
gateway_pid=$!
for _ in $(seq 200); do curl -sf "http://$gw/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
"$m" daemon --node demo --listen 127.0.0.1:$(port) --secret-file "$work/secret" --etcd-endpoints "$etcd" \
  --socket "$work/mitosis.sock" --state-dir "$work/state" --max-concurrency 20 2>"$work/daemon.log" &
daemon_pid=$!
auth="admin:$(cat "$work/gateway/basic-auth-password")"
# (hey's own -a flag is ignored by the packaged hey; send the header.)
basic="Authorization: Basic $(printf %s "$auth" | base64 -w0)"
for _ in $(seq 200); do
  curl -sf -u "$auth" "http://$gw/system/nodes" 2>/dev/null | grep -q '"demo"' && break; sleep 0.05
done
curl -sf -u "$auth" "http://$gw/system/nodes" >/dev/null || { cat "$work/gateway.log" "$work/daemon.log"; exit 1; }

for pol in fork keep-alive; do
  t0=$(date +%s%N)
  curl -sf -u "$auth" -d "{\"service\":\"pandas-$pol\",\"image\":\"$PWD/demo/fn\",\"annotations\":{\"com.mitosis.policy\":\"$pol\"}}" \
    "http://$gw/system/functions" >/dev/null
  echo "deployed pandas-$pol in $(( ($(date +%s%N) - t0) / 1000000 )) ms"
done
echo "== one request each (curl)"
for pol in fork keep-alive; do
  printf '%-10s ' "$pol"; curl -sf -u "$auth" -d 'AAPL' "http://$gw/function/pandas-$pol"
done

mem() { # Σ RSS (MiB) of the function's processes: its seed and instances
  local sum=0 p
  for p in $(pgrep -f "mitosis-bootstrap.py.*pandas-$1" || true); do
    sum=$((sum + $(awk '/^VmRSS/ {print $2}' /proc/$p/status 2>/dev/null || echo 0)))
  done
  echo $((sum / 1024))
}
echo "== a burst: 200 requests, 20 at a time (hey), against each policy"
for pol in fork keep-alive; do
  hey -n 200 -c 20 -m POST -d 'MSFT' -H "$basic" "http://$gw/function/pandas-$pol" >"$work/hey-$pol.txt"
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/hey-$pol.txt")
  p50=$(awk '/ 50% in/ {print $3 * 1000}' "$work/hey-$pol.txt")
  p99=$(awk '/ 99% in/ {print $3 * 1000}' "$work/hey-$pol.txt")
  codes=$(sed -n '/Status code distribution/,/^$/p' "$work/hey-$pol.txt" | tail -n +2 | tr -s ' ' | tr '\n' ' ')
  sleep 1
  printf '%-10s p50 %6.1f ms  p99 %7.1f ms  %6.1f req/s  status%s  memory held after the burst: %s MiB\n' \
    "$pol" "$p50" "$p99" "$rps" "$codes" "$(mem "$pol")"
done
echo "(fork holds one seed; keep-alive holds every instance the burst made warm, for 10 minutes)"
curl -sf -u "$auth" "http://$gw/system/function/pandas-fork"; echo
for pol in fork keep-alive; do curl -sf -u "$auth" -X DELETE -d "{\"functionName\":\"pandas-$pol\"}" "http://$gw/system/functions"; done

echo "== a workflow through the gateway: FINRA audit (examples/finra), 1M trades, 8 rules"
sed "s|\"dir\": \".\"|\"dir\": \"$PWD/examples/finra\"|" examples/finra/finra.json >"$work/finra.json"
curl -sf -u "$auth" -d @"$work/finra.json" "http://$gw/system/workflows" >/dev/null
echo "deployed workflow finra (its step runtime imports numpy and pandas once)"
for tr in fork storage; do
  curl -sf -u "$auth" -d '{"trades": 1000000, "rules": 8}' "http://$gw/workflow/finra?transfer=$tr" >"$work/run-$tr.json" ||
    { echo "the $tr run failed:"; cat "$work/run-$tr.json"; tail -20 "$work/gateway.log"; exit 1; }
  /usr/bin/python3 - "$work/run-$tr.json" "$tr" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
audit = next(s for s in run["steps"] if s["name"] == "audit")
xfer = sum(i.get("load_ms", 0) + i.get("deser_ms", 0) for i in audit.get("instances", []))
print("%-8s %6.0f ms end to end; audit step %5.0f ms; the rules spent %5.0f ms in all loading the trades; verdicts %s"
      % (sys.argv[2], run["ms"], audit["ms"], xfer, run["result"]["digest"]))
PY
done
echo "(fork: every rule is a child of the instance that loaded the trades and reads them in place;"
echo " storage: the loaders pickle into Redis and every rule GETs and unpickles them; same verdicts)"
curl -sf -u "$auth" -X DELETE -d '{"name":"finra"}' "http://$gw/system/workflows"
