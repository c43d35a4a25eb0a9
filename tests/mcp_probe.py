"""A configured MCP server for the tests (config/mcp-configs/): its one tool tells what it was
started with. The secret is told as a digest, so it never reaches a log."""

from __future__ import annotations

import hashlib
import json
import os
import sys

from pydantic import BaseModel

from multibot.mcp.rpc import Server, Tool


class NoArgs(BaseModel):
    pass


def whoami(_: NoArgs) -> str:
    secret = os.environ.get("PROBE_SECRET", "")
    return json.dumps(
        {
            "argv": sys.argv[1:],
            "worktree": os.environ.get("PROBE_WORKTREE"),
            "task": os.environ.get("PROBE_TASK"),
            "secret_sha": hashlib.sha256(secret.encode()).hexdigest()[:16] if secret else None,
        }
    )


if __name__ == "__main__":
    sys.exit(
        Server("probe", "1", [Tool("whoami", "who started me", NoArgs, whoami)]).serve(
            sys.stdin, sys.stdout
        )
    )
