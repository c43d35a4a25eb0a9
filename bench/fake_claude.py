"""A stand-in for the `claude` CLI in benchmarks: an agent whose work is calls to an API.

    fake_claude.py --api URL --turns T --tokens N --state DIR -- <the CLI's own arguments>

It speaks the part of Claude Code's headless protocol multibot uses (measured on 2.1.328):
reads the prompt as one stream-json user line on stdin, prints a system/init line with the
session id (from --session-id, or --resume to continue one), an assistant line per turn, and
one result line. A task is T turns, each one POST to URL/v1/messages asking for N input tokens
(plus N/4 more per earlier turn: the context grows), answered after the API's own latency.
Turns done are kept per session in DIR, so a resumed session goes on where it stopped.

A 429 is met as the binary meets it with CLAUDE_CODE_MAX_RETRIES=1: one retry after the
answer's retry-after (capped at 2 s), then a result with is_error, api_error_status 429,
api_error_type "rate_limit_error" and terminal_reason "api_error", and exit status 1.
The last turn writes <task id>.txt in the working directory, as an agent's edit would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


def call(api: str, body: dict[str, Any]) -> tuple[int, float]:
    """POST one request; return the status and the retry-after it gave (0 if none)."""
    req = urllib.request.Request(
        f"{api}/v1/messages",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return resp.status, 0.0
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, float(exc.headers.get("retry-after") or 0)


def main() -> int:
    own, _, cli = " ".join(sys.argv[1:]).partition(" -- ")
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True)
    p.add_argument("--turns", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--state", type=Path, required=True)
    args = p.parse_args(own.split())
    words = cli.split()
    sid = ""
    for flag in ("--resume", "--session-id"):
        if flag in words:
            sid = words[words.index(flag) + 1]
    sys.stdin.readline()  # the prompt: what the task is does not change the work here
    args.state.mkdir(parents=True, exist_ok=True)
    progress = args.state / f"{sid}.json"
    done = json.loads(progress.read_text())["turns"] if progress.exists() else 0
    emit({"type": "system", "subtype": "init", "session_id": sid, "model": "fake"})
    spent = 0
    while done < args.turns:
        tokens = args.tokens + args.tokens // 4 * done
        body = {"model": "fake", "session": sid, "tokens": tokens}
        status, retry_after = call(args.api, body)
        if status == 429:
            emit({"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 1,
                  "retry_delay_ms": retry_after * 1000, "error_status": 429,
                  "error": "rate_limit", "session_id": sid})  # fmt: skip
            time.sleep(min(retry_after, 2.0))
            status, _ = call(args.api, body)
        if status != 200:
            emit({"type": "result", "subtype": "success", "is_error": True,
                  "api_error_status": status, "api_error_type": "rate_limit_error",
                  "terminal_reason": "api_error", "session_id": sid, "num_turns": done,
                  "result": f"API Error: Request rejected ({status})",
                  "usage": {"input_tokens": spent, "output_tokens": 0}})  # fmt: skip
            return 1
        done += 1
        spent += tokens
        progress.write_text(json.dumps({"turns": done}))
        emit({"type": "assistant", "session_id": sid,
              "message": {"role": "assistant", "content": [{"type": "text",
                                                           "text": f"turn {done}"}]}})  # fmt: skip
    task = os.environ.get("MULTIBOT_TASK_ID", "task")
    Path(f"{task}.txt").write_text(f"{task} done in {args.turns} turns\n")
    emit({"type": "result", "subtype": "success", "is_error": False, "result": f"{task} done",
          "session_id": sid, "num_turns": args.turns,
          "usage": {"input_tokens": spent, "output_tokens": 50 * args.turns}})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
