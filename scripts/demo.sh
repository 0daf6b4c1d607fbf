#!/usr/bin/env bash
# `make demo`: Outpost HQ (SQLite) and one agent enrolled with it, on the embedded defaults with
# a sample SQLite database. Everything lives in ./.outpost/; `make demo-stop` stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.outpost
BIN=$ROOT/.venv/bin
OUTPOST="$BIN/outpost --config $DEMO/agent.json"
AGENT_NAME=demo-agent
# tables as wide as a terminal would show them, even through make
export COLUMNS=${COLUMNS:-160}

stop_pid() { # stop_pid FILE WHAT
    if [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; then
        kill -TERM "$(cat "$1")"
        for _ in $(seq 1 100); do
            kill -0 "$(cat "$1")" 2>/dev/null || break
            sleep 0.1
        done
        echo "Stopped the demo $2."
    fi
    rm -f "$1"
}

stop_all() {
    stop_pid "$DEMO/agent.pid" agent
    stop_pid "$DEMO/hq.pid" HQ
}

wait_until() { # wait_until PIDFILE LOG WHAT COMMAND...
    local pidfile=$1 log=$2 what=$3
    shift 3
    for _ in $(seq 1 300); do
        if "$@" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "The $what did not start; its log:" >&2
            cat "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "The $what did not become ready in 60 s; its log:" >&2
    cat "$log" >&2
    exit 1
}

free_port() { # free_port PREFERRED
    "$BIN/python" - "$1" <<'PY'
import socket, sys
for port in [int(sys.argv[1]), 0]:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    print(s.getsockname()[1])
    s.close()
    break
PY
}

ready() { "$BIN/python" -c "import sys, httpx; sys.exit(0 if httpx.get('$1/readyz', timeout=1).status_code == 200 else 1)"; }

if [[ ${1:-} == stop ]]; then
    stop_all
    exit 0
fi

mkdir -p "$DEMO"
stop_all

# --- Outpost HQ -------------------------------------------------------------------------------
HQ_PORT=$(free_port 9700)
HQ_URL=http://127.0.0.1:$HQ_PORT
HQ_ARGS=(--data-dir "$DEMO/hq")
if [[ ! -s $DEMO/admin.token ]]; then
    "$BIN/outpost" hq admin create --name demo "${HQ_ARGS[@]}" | grep -o 'opa_[A-Za-z0-9_-]*' >"$DEMO/admin.token"
    chmod 600 "$DEMO/admin.token"
fi
export OUTPOST_HQ_URL=$HQ_URL
OUTPOST_HQ_ADMIN_TOKEN=$(cat "$DEMO/admin.token")
export OUTPOST_HQ_ADMIN_TOKEN
"$BIN/outpost" hq serve --port "$HQ_PORT" "${HQ_ARGS[@]}" >"$DEMO/hq.log" 2>&1 &
echo $! >"$DEMO/hq.pid"
wait_until "$DEMO/hq.pid" "$DEMO/hq.log" HQ ready "$HQ_URL"

# --- the agent ------------------------------------------------------------------------------
API_PORT=$(free_port 9701)
cat >"$DEMO/agent.json" <<JSON
{
  "data_dir": "data",
  "key_path": "agent.key",
  "log": {"format": "text", "level": "info"},
  "api": {"client_bind_addresses": ["127.0.0.1:$API_PORT"]},
  "checks": {"interval": 30}
}
JSON
[[ -f $DEMO/agent.key ]] || $OUTPOST key generate "$DEMO/agent.key"
[[ -f $DEMO/sample.sqlite ]] || "$BIN/python" -c \
    "import sys; from pathlib import Path; from outpost.sample_data import create_sample_database as c; c(Path(sys.argv[1]))" \
    "$DEMO/sample.sqlite"
$OUTPOST config validate
if ! $OUTPOST connections list --format json | grep -q '"slug": "sample-shop"'; then
    $OUTPOST connections add sqlite --name "Sample shop" --source-url "$DEMO/sample.sqlite"
fi

# Enrol once: HQ shows the agent's token once; `outpost login` pins HQ for good.
if [[ ! -f $DEMO/data/hq.json ]]; then
    AGENT_TOKEN=$("$BIN/outpost" hq agents create "$AGENT_NAME" --format json |
        "$BIN/python" -c "import json, sys; print(json.load(sys.stdin)['token'])")
    OUTPOST_DEMO_TOKEN=$AGENT_TOKEN $OUTPOST login --hq "$HQ_URL" --token-env OUTPOST_DEMO_TOKEN
fi

$OUTPOST serve >"$DEMO/agent.log" 2>&1 &
echo $! >"$DEMO/agent.pid"
wait_until "$DEMO/agent.pid" "$DEMO/agent.log" agent grep -q "connected to HQ as $AGENT_NAME" "$DEMO/agent.log"

echo
"$BIN/outpost" hq agents list
echo
"$BIN/outpost" hq connections list
echo
SAMPLE_QUERY=$("$BIN/python" -c "from outpost.sample_data import SAMPLE_QUERY; print(' '.join(SAMPLE_QUERY.split()))")
echo "\$ outpost hq query $AGENT_NAME/sample-shop \"$SAMPLE_QUERY\""
"$BIN/outpost" hq query "$AGENT_NAME/sample-shop" "$SAMPLE_QUERY"

cat <<TXT

Outpost HQ is running (pid $(cat "$DEMO/hq.pid"), log $DEMO/hq.log, data $DEMO/hq) and the agent
"$AGENT_NAME" is connected to it (pid $(cat "$DEMO/agent.pid"), log $DEMO/agent.log, data $DEMO/data).

  Dashboard:    $HQ_URL/ui/
  Admin token:  $OUTPOST_HQ_ADMIN_TOKEN   (paste it on the dashboard's sign-in screen)
  HQ API:       $HQ_URL/openapi.json   /metrics   /healthz
  Agent API:    http://127.0.0.1:$API_PORT  (/healthz, /readyz, /metrics)

Try:
  export PATH=$BIN:\$PATH OUTPOST_HQ_URL=$HQ_URL OUTPOST_HQ_ADMIN_TOKEN=$OUTPOST_HQ_ADMIN_TOKEN
  outpost hq query $AGENT_NAME/sample-shop "SELECT name, price_cents FROM products ORDER BY price_cents DESC" --max-rows 5
  outpost hq inspect $AGENT_NAME/sample-shop
  outpost hq jobs list
  outpost --config $DEMO/agent.json connections list
  curl -s $HQ_URL/metrics | grep ^outpost_hq

Stop both with: make demo-stop
TXT
