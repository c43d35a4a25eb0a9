"""A small MCP server on stdin and stdout: newline-delimited JSON-RPC 2.0, tools only.

What Claude Code asks of a stdio server: ``initialize`` (answered with the protocol version it
asked for, when known), ``notifications/initialized``, ``tools/list``, ``tools/call`` and
``ping``. Each tool's arguments are a pydantic model, which gives both its JSON Schema and the
check of what the model sent; a bad call is a tool result with ``isError`` that says what is
wrong, so the model can mend it, never a crash of the server. Calls run on threads of their
own (``ask`` blocks for minutes), their answers written whole, one line each, under a lock.

The SDK (the ``mcp`` package) is not used: it brings an HTTP stack for what is a few dozen
lines of JSON here.
"""

from __future__ import annotations

import json
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from pydantic import BaseModel, ValidationError

VERSIONS = ("2025-06-18", "2025-03-26", "2024-11-05")
PARSE_ERROR, INVALID_REQUEST, NO_METHOD, INVALID_PARAMS = -32700, -32600, -32601, -32602


class ToolFailed(Exception):
    """A tool could not do what was asked: its message goes to the model as the result."""


@dataclass(frozen=True)
class Tool:
    """One tool: its name, what the model is told of it, its arguments and what it does."""

    name: str
    description: str
    args: type[BaseModel]
    run: Callable[[Any], str]

    def listing(self) -> dict[str, Any]:
        schema = self.args.model_json_schema()
        schema.pop("title", None)
        return {"name": self.name, "description": self.description, "inputSchema": schema}


def _reply(msg_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def _error(msg_id: Any, code: int, text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": text}}


def text_result(text: str, *, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": error}


def validation_text(exc: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(x) for x in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
    ]
    return "bad arguments: " + "; ".join(parts)


class Server:
    """Tools served to one client. handle() is the pure part; serve() does the I/O."""

    def __init__(self, name: str, version: str, tools: Iterable[Tool]) -> None:
        self.name, self.version = name, version
        self.tools = {t.name: t for t in tools}

    def handle(self, msg: Mapping[str, Any]) -> dict[str, Any] | None:
        """The answer to one request (None for a notification)."""
        msg_id, method = msg.get("id"), msg.get("method")
        if not isinstance(method, str):
            return None if msg_id is None else _error(msg_id, INVALID_REQUEST, "no method")
        raw = msg.get("params")
        params: Mapping[str, Any] = raw if isinstance(raw, dict) else {}
        if msg_id is None:
            return None  # notifications/initialized, cancelled: nothing to answer
        if method == "initialize":
            asked = params.get("protocolVersion")
            return _reply(
                msg_id,
                {
                    "protocolVersion": asked if asked in VERSIONS else VERSIONS[0],
                    "capabilities": {"tools": {"listChanged": False}},
                    "serverInfo": {"name": self.name, "version": self.version},
                },
            )
        if method == "ping":
            return _reply(msg_id, {})
        if method == "tools/list":
            return _reply(msg_id, {"tools": [t.listing() for t in self.tools.values()]})
        if method == "tools/call":
            return _reply(msg_id, self.call(params))
        return _error(msg_id, NO_METHOD, f"unknown method {method!r}")

    def call(self, params: Mapping[str, Any]) -> dict[str, Any]:
        tool = self.tools.get(str(params.get("name")))
        if tool is None:
            known = ", ".join(self.tools)
            return text_result(f"unknown tool {params.get('name')!r}: one of {known}", error=True)
        try:
            args = tool.args.model_validate(params.get("arguments") or {})
            return text_result(tool.run(args))
        except ValidationError as exc:
            return text_result(validation_text(exc), error=True)
        except ToolFailed as exc:
            return text_result(str(exc), error=True)
        except Exception as exc:  # a bug of ours must not end the agent's session
            detail = traceback.format_exc(limit=4)
            return text_result(f"{tool.name} failed: {exc}\n{detail}", error=True)

    def serve(self, stdin: TextIO, stdout: TextIO) -> int:
        """Answer requests from stdin until it closes; each call on a thread of its own."""
        lock = threading.Lock()

        def write(answer: dict[str, Any] | None) -> None:
            if answer is not None:
                with lock:
                    stdout.write(json.dumps(answer, ensure_ascii=False) + "\n")
                    stdout.flush()

        def answer(msg: Mapping[str, Any]) -> None:
            write(self.handle(msg))

        threads: list[threading.Thread] = []
        for line in stdin:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except json.JSONDecodeError as exc:
                write(_error(None, PARSE_ERROR, f"not JSON: {exc}"))
                continue
            if not isinstance(msg, dict):
                write(_error(None, INVALID_REQUEST, "a request is a JSON object"))
            elif msg.get("method") == "tools/call":
                t = threading.Thread(target=answer, args=(msg,), daemon=True)
                t.start()
                threads.append(t)
            else:
                answer(msg)
        for t in threads:
            t.join(timeout=1.0)
        return 0
