"""A fake Anthropic Messages API on 127.0.0.1 for driving the real Claude Code binary in tests.

The "model" is a script: a callable ``respond(request) -> Reply``, usually built with
``Script`` (rules keyed on markers found anywhere in the conversation). Every request body is
recorded so a test can assert what the model saw.

Claude Code makes side requests besides the main conversation (title generation, quota checks;
no tool list, other models, small max_tokens). ``ApiRequest.is_side`` spots them, and ``Script``
answers them with a plain short text so they never consume a scripted step.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_ids = itertools.count(1)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToolCall:
    """One tool_use block the fake model emits."""

    name: str
    input: Mapping[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class Reply:
    """What the fake model answers: text and/or tool calls, or an HTTP error."""

    text: str = ""
    tools: Sequence[ToolCall] = ()
    status: int = 200
    error_type: str = "invalid_request_error"
    delay_s: float = 0.0
    input_tokens: int = 100
    output_tokens: int = 20
    headers: Mapping[str, str] = field(default_factory=dict)  # sent with the reply (errors)

    @property
    def stop_reason(self) -> str:
        return "tool_use" if self.tools else "end_turn"


def text(s: str, **kw: Any) -> Reply:
    """Reply with plain text."""
    return Reply(text=s, **kw)


def tool(name: str, input: Mapping[str, Any], *, say: str = "", **kw: Any) -> Reply:
    """Reply with one tool call (optionally preceded by text)."""
    return Reply(text=say, tools=(ToolCall(name, input),), **kw)


def structured(obj: Mapping[str, Any]) -> Reply:
    """Reply by filling the synthetic StructuredOutput tool (what --json-schema asks for)."""
    return Reply(tools=(ToolCall("StructuredOutput", obj),))


def error(status: int = 400, kind: str = "invalid_request_error", message: str = "bad") -> Reply:
    """Reply with an HTTP error (400/401 are not retried by the client; 429/5xx are)."""
    return Reply(text=message, status=status, error_type=kind)


def _block_text(block: Any) -> list[str]:
    if isinstance(block, str):
        return [block]
    if not isinstance(block, dict):
        return []
    kind = block.get("type")
    if kind == "text":
        return [str(block.get("text", ""))]
    if kind == "tool_result":
        content = block.get("content")
        if isinstance(content, list):
            return [t for b in content for t in _block_text(b)]
        return [str(content)] if content is not None else []
    if kind == "tool_use":
        return [json.dumps(block.get("input", {}))]
    return []


def message_text(message: Mapping[str, Any]) -> str:
    """Return all the text of one message (text, tool inputs, tool results)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for b in content for t in _block_text(b))
    return ""


@dataclass(frozen=True)
class ApiRequest:
    """One request the fake received."""

    method: str
    path: str
    body: Mapping[str, Any]
    headers: Mapping[str, str]
    at: float

    @property
    def messages(self) -> list[Mapping[str, Any]]:
        msgs = self.body.get("messages")
        return list(msgs) if isinstance(msgs, list) else []

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def session_id(self) -> str | None:
        """The Claude Code session id, from metadata.user_id (JSON or a ..._session_<id> string)."""
        user_id = (self.body.get("metadata") or {}).get("user_id")
        if not isinstance(user_id, str):
            return None
        try:
            parsed = json.loads(user_id)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str):
            return str(parsed["session_id"])
        if "_session_" in user_id:
            return user_id.rsplit("_session_", 1)[1]
        return None

    def tool_names(self) -> list[str]:
        """Names of the tools offered to the model."""
        tools = self.body.get("tools") or []
        return [str(t.get("name")) for t in tools if isinstance(t, dict)]

    def has_tool(self, name: str) -> bool:
        return name in self.tool_names()

    def conversation_text(self) -> str:
        """All the text of the conversation (not the system prompt)."""
        return "\n".join(message_text(m) for m in self.messages)

    def contains(self, needle: str) -> bool:
        return needle in self.conversation_text()

    def tool_results(self) -> list[str]:
        """The text of every tool_result in the conversation, in order."""
        out: list[str] = []
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, list):
                for b in content:
                    if isinstance(b, dict) and b.get("type") == "tool_result":
                        out.append("\n".join(_block_text(b)))
        return out

    def last_tool_result(self) -> str:
        """The text of the latest tool_result, stripped ("no tool result" if none)."""
        results = self.tool_results()
        return results[-1].strip() if results else "no tool result"

    @property
    def is_messages(self) -> bool:
        return self.method == "POST" and self.path.split("?")[0] == "/v1/messages"

    @property
    def is_side(self) -> bool:
        """A side request (title, quota check, ...) rather than the main agent loop."""
        return not self.body.get("tools")


Responder = Callable[[ApiRequest], Reply]


@dataclass
class Rule:
    """When ``marker`` is in the conversation, answer step n with ``replies[n]``.

    n counts the assistant messages after the latest message holding the marker, so a
    scripted task restarts at step 0 when a new prompt carries the marker again (e.g. on
    resume) and injected messages do not reset it. The last reply repeats once exhausted.
    """

    marker: str
    replies: Sequence[Reply | Callable[[ApiRequest], Reply]]


@dataclass
class Script:
    """A scripted model: the rule whose marker appears latest in the conversation answers."""

    rules: Sequence[Rule]
    fallback: Reply = field(default_factory=lambda: text("OK."))
    side: Reply = field(default_factory=lambda: text("Side reply"))

    def __call__(self, req: ApiRequest) -> Reply:
        if req.is_side:
            return self.side
        best: tuple[int, Rule] | None = None
        for rule in self.rules:
            for i in range(len(req.messages) - 1, -1, -1):
                if rule.marker in message_text(req.messages[i]):
                    if best is None or i > best[0]:
                        best = (i, rule)
                    break
        if best is None:
            return self.fallback
        at, rule = best
        step = sum(1 for m in req.messages[at + 1 :] if m.get("role") == "assistant")
        reply = rule.replies[min(step, len(rule.replies) - 1)]
        return reply(req) if callable(reply) else reply


def _sse(event: str, data: Mapping[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _content(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if reply.text:
        blocks.append({"type": "text", "text": reply.text})
    for call in reply.tools:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id or f"toolu_fake{next(_ids):06d}",
                "name": call.name,
                "input": dict(call.input),
            }
        )
    return blocks


def _usage(reply: Reply) -> dict[str, int]:
    return {
        "input_tokens": reply.input_tokens,
        "output_tokens": reply.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def sse_body(reply: Reply, model: str) -> bytes:
    """Render a reply as the server-sent events of a streaming Messages response."""
    msg_id = f"msg_fake{next(_ids):06d}"
    usage = _usage(reply)
    start: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    out = [_sse("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(_content(reply)):
        first: dict[str, Any]
        if block["type"] == "text":
            first = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            first = {**block, "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        out.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": first},
            )
        )
        out.append(
            _sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        )
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))
    out.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": reply.output_tokens},
            },
        )
    )
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return b"".join(out)


def json_body(reply: Reply, model: str) -> bytes:
    """Render a reply as a non-streaming Messages response."""
    return json.dumps(
        {
            "id": f"msg_fake{next(_ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": _content(reply),
            "stop_reason": reply.stop_reason,
            "stop_sequence": None,
            "usage": _usage(reply),
        }
    ).encode()


class FakeAPI:
    """A threaded HTTP server answering Messages API calls from a responder."""

    def __init__(self, respond: Responder | None = None) -> None:
        self.respond: Responder = respond or Script([])
        self._requests: list[ApiRequest] = []
        self.unknown: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> FakeAPI:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    @property
    def port(self) -> int:
        assert self._server is not None, "FakeAPI not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, api_key: str = "test-key") -> dict[str, str]:
        """Environment that points a Claude Code child at this server, offline."""
        return {
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_API_KEY": api_key,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_AUTOUPDATER": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
        }

    # -- recorded requests -------------------------------------------------------------
    @property
    def requests(self) -> list[ApiRequest]:
        """Every request so far (a copy)."""
        with self._lock:
            return list(self._requests)

    def messages_requests(self, *, main_only: bool = True) -> list[ApiRequest]:
        """The POST /v1/messages requests, by default only those of the main agent loop."""
        return [r for r in self.requests if r.is_messages and not (main_only and r.is_side)]

    def saw(self, needle: str) -> bool:
        """Whether any main request's conversation contained needle."""
        return any(r.contains(needle) for r in self.messages_requests())

    def _record(self, req: ApiRequest) -> None:
        with self._lock:
            self._requests.append(req)

    # -- HTTP --------------------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean; unknown endpoints are kept in fake.unknown

            def _send(
                self, status: int, body: bytes, ctype: str, headers: Mapping[str, str] = {}
            ) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                # One request per connection: no keep-alive handler thread outlives a test.
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def _read_body(self) -> Mapping[str, Any]:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    parsed = json.loads(raw) if raw else {}
                except ValueError:
                    parsed = {"_raw": raw.decode("utf-8", "replace")}
                return parsed if isinstance(parsed, dict) else {"_json": parsed}

            def do_GET(self) -> None:
                self._handle("GET", {})

            def do_HEAD(self) -> None:
                self._handle("HEAD", {})

            def do_POST(self) -> None:
                self._handle("POST", self._read_body())

            def _handle(self, method: str, body: Mapping[str, Any]) -> None:
                req = ApiRequest(method, self.path, body, dict(self.headers.items()), time.time())
                fake._record(req)
                path = self.path.split("?")[0]
                if method == "POST" and path == "/v1/messages/count_tokens":
                    n = max(1, len(json.dumps(body)) // 4)
                    self._send(200, json.dumps({"input_tokens": n}).encode(), "application/json")
                    return
                if method != "POST" or path != "/v1/messages":
                    with fake._lock:
                        fake.unknown.append(f"{method} {self.path}")
                    log.warning("fake API: no such endpoint %s %s", method, self.path)
                    self._send(
                        404,
                        b'{"type":"error","error":{"type":"not_found_error",'
                        b'"message":"not found"}}',
                        "application/json",
                    )
                    return
                try:
                    reply = fake.respond(req)
                except Exception as exc:  # a broken script must show up, not hang the client
                    reply = error(400, "invalid_request_error", f"fake script failed: {exc!r}")
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.status != 200:
                    err = {
                        "type": "error",
                        "error": {"type": reply.error_type, "message": reply.text},
                    }
                    body_ = json.dumps(err).encode()
                    self._send(reply.status, body_, "application/json", reply.headers)
                    return
                model = str(body.get("model", "claude-fake"))
                if body.get("stream"):
                    self._send(200, sse_body(reply, model), "text/event-stream")
                else:
                    self._send(200, json_body(reply, model), "application/json")

        return Handler


def wait_for_requests(
    fake: FakeAPI, pred: Callable[[Iterable[ApiRequest]], bool], timeout: float = 30.0
) -> bool:
    """Wait until pred(all requests) holds; return whether it did in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred(fake.requests):
            return True
        time.sleep(0.05)
    return pred(fake.requests)


def claude_env(fake: FakeAPI, root: Path) -> dict[str, str]:
    """Environment for a Claude Code child under root: private HOME and config dir, fake API."""
    home, config, scratch = root / "home", root / "claude-config", root / "claude-tmp"
    for folder in (home, config, scratch):
        folder.mkdir(parents=True, exist_ok=True)
    # CLAUDE_CODE_TMPDIR: Claude Code's scratch files stay in the test's folder, not /tmp.
    return {
        **fake.env(),
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(config),
        "CLAUDE_CODE_TMPDIR": str(scratch),
    }
