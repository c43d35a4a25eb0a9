#!/usr/bin/env bash
# Open the multibot tmux session: the master, a live status pane and one pane per worker.
#
#   ./scripts/spawn-master.sh --demo                       offline demo, no Claude account needed
#   ./scripts/spawn-master.sh --repo PATH --goal "TEXT"     Opus plans, Claude workers build
#   ./scripts/spawn-master.sh --repo PATH --plan plan.json  your plan, no planning call
#
# Other options go to `multibot master` (--backend claude|shell, --max-workers N, --approve,
# --fresh). --home DIR picks the runtime home; --detach never attaches. Without a terminal
# (scripts, CI) it runs detached, prints the run as it goes, and exits 0 only if it succeeded.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

demo=0 detach=0 home="${MULTIBOT_HOME:-}" timeout="${MULTIBOT_FOLLOW_TIMEOUT:-3600}"
socket="${MULTIBOT_TMUX_SOCKET:-multibot}" session="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1 ;;
    --detach) detach=1 ;;
    --home) home="$2"; shift ;;
    --socket) socket="$2"; shift ;;
    --session) session="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done

command -v tmux >/dev/null || { say "tmux is not installed (apt-get install tmux)"; exit 2; }
ensure_venv
mb() { "$PY" -m multibot --home "$home" "$@"; }

if [ $demo -eq 1 ]; then
  home="${home:-$ROOT/demo}"
  session="${session:-multibot-demo}"
  if tmux -L "$socket" has-session -t "$session" 2>/dev/null; then
    say "the demo is already running"
  else
    say "preparing the sample repository in $home"
    mapfile -t prepared < <(mb demo-prepare)
    args=(--repo "${prepared[0]}" --plan "${prepared[1]}" --backend shell "${args[@]}")
  fi
else
  home="${home:-$ROOT}"
  session="${session:-multibot}"
  if [ ${#args[@]} -eq 0 ] && ! tmux -L "$socket" has-session -t "$session" 2>/dev/null; then
    if [ ! -f "$home/state/system-state.json" ]; then
      sed -n '2,12p' "$0"; exit 2
    fi
    say "no arguments: resuming the run recorded in $home/state"
  fi
fi

mb session --socket "$socket" --session "$session" -- "${args[@]}"

if [ $detach -eq 0 ] && [ -t 0 ] && [ -t 1 ]; then
  exec tmux -L "$socket" attach -t "$session"
fi

say "running detached; watch it live with: tmux -L $socket attach -t $session"
set +e
mb follow --timeout "$timeout"
rc=$?
set -e
if [ -z "${TMUX:-}" ] || [ $detach -eq 0 ]; then
  tmux -L "$socket" kill-session -t "$session" 2>/dev/null || true
fi
if [ $demo -eq 1 ]; then
  repo="$home/sample-repo"
  say "integration branch: git -C $repo log --oneline multibot/integration"
  git -C "$repo" log --oneline multibot/integration | head -20 >&2 || true
  say "state files: $home/state   timeline: $PY -m multibot --home $home timeline"
fi
exit $rc
