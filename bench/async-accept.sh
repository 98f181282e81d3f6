#!/usr/bin/env bash
# The gateway's async accept rate: one gateway (embedded etcd) and one node
# daemon on this host, a function of demo/fn deployed, then 2000 POSTs to
# /async-function/ 20 at a time (hey); prints requests/s and the p50/p99 of
# the 202s. As root. Extra arguments go to the gateway (e.g.
# --async-memory-only). BIN (default: built from this tree) is a directory
# holding mitosis and mitosisd.
#
#   bash bench/async-accept.sh                       # durable accepts (the default)
#   bash bench/async-accept.sh --async-memory-only   # kept in memory only
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
work=$(mktemp -d /tmp/async-accept.XXXXXX)
gpid= dpid=
cleanup() {
  [ -n "$gpid" ] && kill "$gpid" 2>/dev/null && wait "$gpid" 2>/dev/null || true
  [ -n "$dpid" ] && kill -INT "$dpid" 2>/dev/null && wait "$dpid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
bin=${BIN:-}
if [ -z "$bin" ]; then bin=$work/bin; CGO_ENABLED=0 go build -o "$bin/" ./cmd/mitosis ./cmd/mitosisd; fi
head -c 32 /dev/urandom | base64 >"$work/secret"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
gw=127.0.0.1:$(port) etcd=http://127.0.0.1:$(port) peer=http://127.0.0.1:$(port)
"$bin/mitosis" gateway "$@" --listen "$gw" --state-dir "$work/gw" --secret-file "$work/secret" \
  --etcd-listen "$etcd" --etcd-peer-listen "$peer" --async-drain-timeout -1s 2>"$work/gw.log" &
gpid=$!
for _ in $(seq 200); do curl -sf "http://$gw/healthz" >/dev/null 2>&1 && break; sleep 0.05; done
"$bin/mitosis" daemon --node n --listen "127.0.0.1:$(port)" --secret-file "$work/secret" --etcd-endpoints "$etcd" \
  --socket "$work/s.sock" --state-dir "$work/st" --max-concurrency 8 2>"$work/d.log" &
dpid=$!
auth="admin:$(cat "$work/gw/basic-auth-password")"
basic="Authorization: Basic $(printf %s "$auth" | base64 -w0)"
for _ in $(seq 200); do curl -sf -u "$auth" "http://$gw/system/nodes" 2>/dev/null | grep -q '"n"' && break; sleep 0.05; done
curl -sf -u "$auth" -d "{\"service\":\"f\",\"image\":\"$PWD/demo/fn\"}" "http://$gw/system/functions" >/dev/null
curl -sf -u "$auth" -d AAPL "http://$gw/function/f" >/dev/null
hey -n 2000 -c 20 -m POST -d MSFT -H "$basic" "http://$gw/async-function/f" >"$work/hey.txt"
echo "$(awk '/Requests\/sec/ {print "req/s", $2}' "$work/hey.txt") $(awk '/ 50% in/ {print "p50_ms", $3*1000}' "$work/hey.txt") $(awk '/ 99% in/ {print "p99_ms", $3*1000}' "$work/hey.txt") status $(sed -n '/Status code distribution/,/^$/p' "$work/hey.txt" | tail -n +2 | tr -s ' ' | tr '\n' ' ')"
