#!/usr/bin/env bash
# Pre-create worktrees for N workers: ./scripts/setup-worktrees.sh --repo PATH N
# (The master creates them on demand anyway; this saves the wait and runs the set-up hook early.)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_venv
exec "$PY" -m multibot ${MULTIBOT_HOME:+--home "$MULTIBOT_HOME"} setup-worktrees "$@"
