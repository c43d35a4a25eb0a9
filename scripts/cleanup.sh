#!/usr/bin/env bash
# Stop the multibot tmux session and every process of the run (master, workers, their agents,
# the status pane), then remove merged worktrees and prune stale ones. Unmerged work is never
# deleted unless you pass --force.
#   ./scripts/cleanup.sh [--demo] [--home DIR] [--force]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
home="${MULTIBOT_HOME:-$ROOT}" socket="${MULTIBOT_TMUX_SOCKET:-multibot}" session="multibot" force=()
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) home="$ROOT/demo"; session="multibot-demo" ;;
    --home) home="$2"; shift ;;
    --force) force=(--force) ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
ensure_venv
# The session is closed only if it is this home's run (another home may use the same name).
if [ -d "$home" ] && theirs="$(tmux -L "$socket" show-environment -t "=$session" MULTIBOT_HOME \
    2>/dev/null)" && [ "$theirs" = "MULTIBOT_HOME=$(cd "$home" && pwd -P)" ]; then
  say "stopping tmux session $session"
  tmux -L "$socket" kill-session -t "=$session"
fi
# --stop also finds the run's processes by their home (whatever session or socket they use),
# including agents that outlived their worker's pane.
"$PY" -m multibot --home "$home" cleanup --stop "${force[@]}"
