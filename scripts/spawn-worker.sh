#!/usr/bin/env bash
# Start one worker by hand in this terminal: ./scripts/spawn-worker.sh ID [--backend shell|claude]
# It registers, beats its heartbeat and waits for the master's assignments in its inbox.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ $# -ge 1 ] || { echo "usage: $0 ID [--backend claude|shell] [--generation N]" >&2; exit 2; }
id="$1"; shift
ensure_venv
exec "$PY" -m multibot ${MULTIBOT_HOME:+--home "$MULTIBOT_HOME"} worker --id "$id" "$@"
