#!/usr/bin/env bash
# Stop the multibot tmux session and its processes, then remove merged worktrees and prune
# stale ones. Unmerged work is never deleted unless you pass --force.
#   ./scripts/cleanup.sh [--demo] [--home DIR] [--force]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
home="${MULTIBOT_HOME:-$ROOT}" socket="${MULTIBOT_TMUX_SOCKET:-multibot}" session="multibot" force=()
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) home="$ROOT/demo"; session="multibot-demo" ;;
    --home) home="$2"; shift ;;
    --force) force=(--force) ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
ensure_venv
if tmux -L "$socket" has-session -t "$session" 2>/dev/null; then
  say "stopping tmux session $session"
  tmux -L "$socket" kill-session -t "$session"
fi
# Workers of this home that outlived their panes (e.g. started with --no-tmux).
pkill -f -- "multibot --home $home (worker|master)" 2>/dev/null && say "stopped leftover processes" || true
"$PY" -m multibot --home "$home" cleanup "${force[@]}"
