#!/usr/bin/env bash
# `make demo`: run the agent on the embedded defaults with a sample SQLite database.
# Everything lives in ./.outpost/; `make demo-stop` stops the agent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.outpost
BIN=$ROOT/.venv/bin
OUTPOST="$BIN/outpost --config $DEMO/agent.json"

stop_agent() {
    if [[ -f $DEMO/agent.pid ]] && kill -0 "$(cat "$DEMO/agent.pid")" 2>/dev/null; then
        kill -TERM "$(cat "$DEMO/agent.pid")"
        for _ in $(seq 1 100); do
            kill -0 "$(cat "$DEMO/agent.pid")" 2>/dev/null || break
            sleep 0.1
        done
        echo "Stopped the demo agent."
    fi
    rm -f "$DEMO/agent.pid"
}

if [[ ${1:-} == stop ]]; then
    stop_agent
    exit 0
fi

mkdir -p "$DEMO"
stop_agent

# A free port for the local API: 9701 unless something else has it.
PORT=$("$BIN/python" - <<'PY'
import socket
for port in [9701, 0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(s.getsockname()[1])
    s.close()
    break
PY
)

cat > "$DEMO/agent.json" <<JSON
{
  "data_dir": "data",
  "key_path": "agent.key",
  "log": {"format": "text", "level": "info"},
  "api": {"client_bind_addresses": ["127.0.0.1:$PORT"]},
  "checks": {"interval": 30}
}
JSON

[[ -f $DEMO/agent.key ]] || $OUTPOST key generate "$DEMO/agent.key"
[[ -f $DEMO/sample.sqlite ]] || "$BIN/python" -c \
    "import sys; from pathlib import Path; from outpost.sample_data import create_sample_database as c; c(Path(sys.argv[1]))" \
    "$DEMO/sample.sqlite"

$OUTPOST config validate
$OUTPOST serve >"$DEMO/agent.log" 2>&1 &
echo $! >"$DEMO/agent.pid"

for _ in $(seq 1 150); do
    if "$BIN/python" -c "import sys, httpx; sys.exit(0 if httpx.get('http://127.0.0.1:$PORT/readyz', timeout=1).status_code == 200 else 1)" 2>/dev/null; then
        break
    fi
    if ! kill -0 "$(cat "$DEMO/agent.pid")" 2>/dev/null; then
        echo "The agent did not start; its log:" >&2
        cat "$DEMO/agent.log" >&2
        exit 1
    fi
    sleep 0.2
done

if ! $OUTPOST connections list --format json | grep -q '"slug": "sample-shop"'; then
    $OUTPOST connections add sqlite --name "Sample shop" --source-url "$DEMO/sample.sqlite"
fi

echo
$OUTPOST status
echo
$OUTPOST connections list
echo
SAMPLE_QUERY=$("$BIN/python" -c "from outpost.sample_data import SAMPLE_QUERY; print(' '.join(SAMPLE_QUERY.split()))")
$OUTPOST query sample-shop "$SAMPLE_QUERY"

cat <<TXT

The Outpost agent is running (pid $(cat "$DEMO/agent.pid")), with its data in $DEMO/data,
its key in $DEMO/agent.key and its log in $DEMO/agent.log.
  API:     http://127.0.0.1:$PORT  (/healthz, /readyz, /metrics)

Try:
  export OUTPOST_CONFIG=$DEMO/agent.json PATH=$BIN:\$PATH
  outpost connections list
  outpost connections test sample-shop
  outpost query sample-shop "SELECT name, price FROM products ORDER BY price DESC" --max-rows 5
  outpost query sample-shop "SELECT * FROM customers" --format csv
  outpost connections add postgres --name "Local PG" --host 127.0.0.1 --user postgres --database test
  outpost backup --path $DEMO/demo.backup
  outpost config show
  curl -s http://127.0.0.1:$PORT/metrics | grep ^outpost_

Stop it with: make demo-stop
TXT
