#!/usr/bin/env bash
# Run the whole test suite: lint (ruff), types (mypy --strict), then pytest.
# On a fresh machine it first creates .venv, installs multibot with its dev tools and the
# pinned Claude Code binary. Extra arguments go to pytest (e.g. -k worker, -x).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
set -e
ensure_venv dev
ensure_claude || [ -z "${CI:-}" ] || { say "CI needs the claude binary"; exit 1; }
ensure_sandbox_tools || [ -z "${CI:-}" ] || { say "CI needs the sandbox's tools"; exit 1; }
set +e
cd "$ROOT"
say "ruff"
"$VENV/bin/ruff" check multibot tests bench && "$VENV/bin/ruff" format --check multibot tests bench
rc_ruff=$?
say "mypy"
"$VENV/bin/mypy" multibot
rc_mypy=$?
say "pytest"
export MULTIBOT_CLAUDE_BIN="$CLAUDE_BIN"
"$VENV/bin/pytest" -q "$@"
rc_pytest=$?
say "ruff=$rc_ruff mypy=$rc_mypy pytest=$rc_pytest"
[ $rc_ruff -eq 0 ] && [ $rc_mypy -eq 0 ] && [ $rc_pytest -eq 0 ]
