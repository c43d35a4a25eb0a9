"""Messages that prove their sender: HMAC-SHA256 keys per worker generation.

The run key (``state/run.key``, 0600, made by the master when a run starts) is the root.
Everything else is derived from it, so nothing but the run key is ever stored:

* ``worker key`` = HMAC(run key, "worker", id, generation). The master signs what it sends to a
  worker with it, and the worker signs what it sends. The worker process gets it at launch
  through its private launch file (read and deleted at once), never on a command line and never
  in its environment, so the agent it starts does not inherit it.
* ``agent key`` = HMAC(worker key, "agent", task id). The agent gets it in its environment: its
  `multibot report` and `multibot ask` sign with it and go to their own worker, which checks
  them and passes them on. An agent can speak only as its worker, about its task, and only
  in the kinds an agent may use: it knows no other worker's key nor the master's.

A message's ``mac`` is ``<kind>.<generation>.<hex>`` over its JSON without the mac. A person
(whose shell can read the run key) signs as anyone with ``multibot send``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from multibot import protocol
from multibot.errors import MultibotError
from multibot.layout import Home
from multibot.protocol import Envelope

KEY_BYTES = 32
WORKER, AGENT = "worker", "agent"
# What an agent's commands may say (to their own worker, which passes them on).
AGENT_SAYS = (protocol.StatusUpdate, protocol.Question)


def _derive(key: bytes, *parts: str) -> bytes:
    return hmac.new(key, "\0".join(parts).encode(), hashlib.sha256).digest()


def agent_key(worker_key: bytes, task_id: str) -> bytes:
    return _derive(worker_key, AGENT, task_id)


@dataclass(frozen=True)
class Keys:
    """The run key and what is derived from it (the master's side, and a person's)."""

    run: bytes

    def worker(self, worker_id: str, generation: int) -> bytes:
        return _derive(self.run, WORKER, worker_id, str(generation))

    def agent(self, worker_id: str, generation: int, task_id: str) -> bytes:
        return agent_key(self.worker(worker_id, generation), task_id)


def create_keys(home: Home) -> Keys:
    """Make a new run key (a new run: messages signed for an old one no longer verify)."""
    home.state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = home.run_key.with_name(f".{home.run_key.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, home.run_key)  # rename replaces a symlink itself, never its target
    return Keys(key)


def load_keys(home: Home) -> Keys:
    """Read the run key; MultibotError if there is none or it is not one."""
    path = home.run_key
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise MultibotError(
            f"no run key at {path}: the master makes it when a run starts"
        ) from None
    except OSError as exc:
        raise MultibotError(f"cannot read the run key {path}: {exc}") from exc
    try:
        text = os.read(fd, 1024).decode(errors="replace").strip()
    finally:
        os.close(fd)
    key = key_from_hex(text, path)
    return Keys(key)


def keys_of(home: Home, *, create: bool = False) -> Keys:
    """The run's keys, made if there are none yet and create is set."""
    if create and not home.run_key.exists():
        return create_keys(home)
    return load_keys(home)


# -- signing ------------------------------------------------------------------------------------


def _body(message: Envelope) -> bytes:
    return message.model_copy(update={"mac": None}).model_dump_json().encode()


def _mac(key: bytes, message: Envelope) -> str:
    return hmac.new(key, _body(message), hashlib.sha256).hexdigest()


def sign(message: Envelope, key: bytes, generation: int, kind: str = WORKER) -> Envelope:
    """Return message with its mac: signed with key, which is kind's for generation."""
    unsigned = message.model_copy(update={"mac": None})
    return message.model_copy(update={"mac": f"{kind}.{generation}.{_mac(key, unsigned)}"})


@dataclass(frozen=True)
class Mac:
    """What a message's mac claims: the kind of key and its generation."""

    kind: str
    generation: int
    digest: str


def mac_of(message: Envelope) -> Mac | None:
    """The claim in message's mac, or None if it has none or it is malformed."""
    if not message.mac:
        return None
    kind, _, rest = message.mac.partition(".")
    gen, _, digest = rest.partition(".")
    if kind not in (WORKER, AGENT) or not gen.isdigit() or len(digest) != 64:
        return None
    return Mac(kind, int(gen), digest)


def verifies(message: Envelope, key: bytes) -> bool:
    """True if message's mac was made with key."""
    claim = mac_of(message)
    return claim is not None and hmac.compare_digest(claim.digest, _mac(key, message))


@dataclass(frozen=True)
class Refusal:
    """Why a message is not taken. forged: it does not prove its sender (counted, and shown
    in status); else it is genuine but stale (signed for an earlier incarnation)."""

    reason: str
    forged: bool = True


def check_from_worker(keys: Keys, message: Envelope) -> Refusal | None:
    """(master) None if message was signed by the worker it names, at its generation."""
    claim = mac_of(message)
    if claim is None:
        return Refusal(f"{message.type} from {message.sender!r} is not signed")
    if claim.kind != WORKER or claim.generation != message.generation:
        return Refusal(
            f"{message.type} from {message.sender!r} is signed with a {claim.kind} key of "
            f"generation {claim.generation}: only a worker's own key, at its generation, counts"
        )
    if not verifies(message, keys.worker(message.sender, claim.generation)):
        return Refusal(f"{message.type} from {message.sender!r}: its signature does not verify")
    return None


@dataclass(frozen=True)
class WorkerKey:
    """A worker process's key, and what it checks its messages with."""

    worker_id: str
    generation: int
    key: bytes

    def sign(self, message: Envelope) -> Envelope:
        return sign(message, self.key, self.generation)

    def sign_for_agent(self, message: Envelope, task_id: str) -> Envelope:
        return sign(message, agent_key(self.key, task_id), self.generation, AGENT)

    def check(self, message: Envelope, task_id: str | None) -> Refusal | None:
        """(worker) None if message is from the master (or a person) for this generation, or
        from this worker's own agent about task_id in a kind an agent may use."""
        claim = mac_of(message)
        if claim is None:
            return Refusal(f"{message.type} from {message.sender!r} is not signed")
        if claim.generation < self.generation:
            return Refusal(
                f"{message.type} was signed for generation {claim.generation} of "
                f"{self.worker_id}, this is {self.generation} (sent before a restart)",
                forged=False,
            )
        if claim.generation > self.generation:
            return Refusal(f"{message.type} is signed for a later generation {claim.generation}")
        if claim.kind == WORKER:
            if message.sender == self.worker_id or not verifies(message, self.key):
                return Refusal(f"{message.type} from {message.sender!r} does not verify")
            return None
        if message.sender != self.worker_id or not isinstance(message.payload, AGENT_SAYS):
            return Refusal(f"an agent's key cannot sign {message.type} from {message.sender!r}")
        if task_id is None or message.task_id != task_id:
            return Refusal(f"{message.type} names task {message.task_id}, not mine ({task_id})")
        if not verifies(message, agent_key(self.key, task_id)):
            return Refusal(f"{message.type} from the agent does not verify for {task_id}")
        return None


def key_from_hex(text: str, where: str | Path) -> bytes:
    """The key written as text (a run key, MULTIBOT_AGENT_KEY); MultibotError naming where."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise MultibotError(f"{where}: not a key ({KEY_BYTES * 2} hex digits)")
    return key
