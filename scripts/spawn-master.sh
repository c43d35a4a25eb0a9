#!/usr/bin/env bash
# Open the multibot tmux session: the master, a live status pane and one pane per worker.
#
#   ./scripts/spawn-master.sh --demo                       offline demo, no Claude account needed
#   ./scripts/spawn-master.sh --repo PATH --goal "TEXT"     Opus plans, Claude workers build
#   ./scripts/spawn-master.sh --repo PATH --plan plan.json  your plan, no planning call
#
# Other options go to `multibot master` (--backend claude|shell, --max-workers N, --approve,
# --fresh). --home DIR picks the runtime home; --detach never attaches. Without a terminal
# (scripts, CI) it runs detached, prints the run as it goes, and exits 0 only if it succeeded;
# the session is closed at the end (and on Ctrl-C or SIGTERM), so nothing is left running.
# The tmux socket is $MULTIBOT_TMUX_SOCKET (default "multibot") or --socket NAME.
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
    # The master runs in its pane with the home as its folder: make paths absolute first.
    --repo|--plan)
      [ $# -ge 2 ] || { say "$1 needs a path"; exit 2; }
      args+=("$1" "$(realpath -m -- "$2")"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

command -v tmux >/dev/null || { say "tmux is not installed (apt-get install tmux)"; exit 2; }
ensure_venv
mb() { "$PY" -m multibot --home "$home" "$@"; }

# master_alive: the session's master pane still runs (a finished run leaves it dead).
master_alive() {
  tmux -L "$socket" list-panes -s -t "=$session" -F '#{@multibot_title}:#{pane_dead}' \
    2>/dev/null | grep -qx 'master:0'
}

if [ $demo -eq 1 ]; then
  home="${home:-$ROOT/demo}"
  session="${session:-multibot-demo}"
  if master_alive; then
    say "the demo is already running"
  else
    # A finished demo's session (dead master pane, status pane still on) gives way to a new one.
    tmux -L "$socket" kill-session -t "=$session" 2>/dev/null || true
    say "preparing the sample repository in $home"
    prepared_out="$(mb demo-prepare)" || exit 2
    mapfile -t prepared <<<"$prepared_out"
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

# Where this attempt's lines will begin in the master's log: `follow` shows only those.
master_log="${home:-$ROOT}/state/logs/master.log"
log_start=$(stat -c %s "$master_log" 2>/dev/null || echo 0)
mb session --socket "$socket" --session "$session" -- "${args[@]}"

if [ $detach -eq 0 ] && [ -t 0 ] && [ -t 1 ]; then
  if [ -n "${TMUX:-}" ]; then
    # tmux refuses to attach from inside another session unless TMUX is unset; the prefix
    # key then goes to your outer tmux: Ctrl-b Ctrl-b d detaches the inner one.
    say "attaching inside your tmux: detach with Ctrl-b Ctrl-b d"
    exec env -u TMUX tmux -L "$socket" attach -t "=$session"
  fi
  exec tmux -L "$socket" attach -t "=$session"
fi

close_session() {
  # Inside tmux with --detach the session stays, to be looked at; otherwise nothing is left.
  if [ -z "${TMUX:-}" ] || [ $detach -eq 0 ]; then
    tmux -L "$socket" kill-session -t "=$session" 2>/dev/null || true
  fi
}
follower=""
interrupted() { [ -z "$follower" ] || kill "$follower" 2>/dev/null; close_session; exit "$1"; }
trap 'interrupted 130' INT
trap 'interrupted 143' TERM HUP
say "running detached; watch it live with: tmux -L $socket attach -t $session"
# In the background and waited for: bash runs a trap only once its foreground command is
# done, but `wait` gives way to a signal at once.
"$PY" -m multibot --home "$home" follow --timeout "$timeout" --socket "$socket" \
  --session "$session" --from-byte "$log_start" &
follower=$!
set +e
wait "$follower"
rc=$?
set -e
trap - INT TERM HUP
close_session
if [ $demo -eq 1 ]; then
  repo="$home/sample-repo"
  if git -C "$repo" rev-parse -q --verify multibot/integration >/dev/null 2>&1; then
    say "integration branch: git -C $repo log --oneline multibot/integration"
    git -C "$repo" log --oneline multibot/integration | head -20 >&2 || true
  fi
  say "state files: $home/state   timeline: $PY -m multibot --home $home timeline"
fi
exit $rc
