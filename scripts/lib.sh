# Shared by the scripts: find the project, make sure its virtual environment is ready.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

say() { printf '\033[1m[multibot]\033[0m %s\n' "$*" >&2; }

# ensure_venv [extra]: create .venv if missing and install the project (with [extra] if given).
ensure_venv() {
  local extra="${1:-}" spec="$ROOT" stamp
  [ -n "$extra" ] && spec="$ROOT[$extra]"
  stamp="$VENV/.multibot-installed${extra:+-$extra}"
  if [ ! -x "$PY" ]; then
    say "creating virtual environment in .venv"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    say "installing multibot${extra:+ with $extra tools} (first run only)"
    "$PY" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    "$PY" -m pip install --quiet -e "$spec"
    touch "$stamp"
  fi
}

# ensure_claude: install the pinned Claude Code binary under .cache/ (used by the tests).
CLAUDE_VERSION="2.1.328"
CLAUDE_BIN="$ROOT/.cache/claude-code/node_modules/.bin/claude"
ensure_claude() {
  if [ -x "$CLAUDE_BIN" ] && "$CLAUDE_BIN" --version 2>/dev/null | grep -q "$CLAUDE_VERSION"; then
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    say "npm not found: the tests against the real claude binary cannot run"
    return 1
  fi
  say "installing @anthropic-ai/claude-code@$CLAUDE_VERSION into .cache/ (first run only)"
  mkdir -p "$ROOT/.cache/claude-code"
  npm install --silent --no-audit --no-fund --prefix "$ROOT/.cache/claude-code" \
    "@anthropic-ai/claude-code@$CLAUDE_VERSION" >/dev/null
}

# Claude Code's sandbox on Linux needs bubblewrap and socat (docs/security.md).
ensure_sandbox_tools() {
  [ "$(uname -s)" = Linux ] || return 0
  if command -v bwrap >/dev/null 2>&1 && command -v socat >/dev/null 2>&1; then
    return 0
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    say "installing bubblewrap and socat for the agents' sandbox (apt, first run only)"
    $sudo apt-get install -y -qq bubblewrap socat >/dev/null 2>&1 \
      || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq bubblewrap socat >/dev/null 2>&1; }
  fi
  command -v bwrap >/dev/null 2>&1 && command -v socat >/dev/null 2>&1 \
    || { say "bubblewrap and socat are missing: install them (apt-get install bubblewrap socat)"; return 1; }
}
