#!/usr/bin/env bash
# CPU one FINRA audit rule costs as a remote-fork child, as an os.fork() of
# one forked child (a fork server), and as an os.fork() on the host (the
# bound); see bench/finra-rule-cost.py. As root:
#
#   bash bench/finra-rule-cost.sh [TRADES] [ROUNDS] [RULES]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
bin=$(mktemp -d /tmp/mitosis-rulecost.XXXXXX)
trap 'rm -rf "$bin"' EXIT
CGO_ENABLED=0 go build -o "$bin/" ./cmd/mitosis ./cmd/mitosisd
/usr/bin/python3 bench/finra-rule-cost.py "$bin/mitosis" "${1:-4000000}" "${2:-5}" "${3:-16}"
