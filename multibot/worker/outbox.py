"""A worker's messages on their way: sent in order, each once it can be made durable."""

from __future__ import annotations

from collections.abc import Callable

from multibot import mailbox, protocol
from multibot.errors import MultibotError, SendError
from multibot.layout import Home


class Outbox:
    """Messages not sent yet, in order. One that could not be made durable (a full disk)
    waits, with those after it, for the next flush; one to an inbox that is gone is dropped."""

    def __init__(self, home: Home, show: Callable[[str], None]) -> None:
        self.home, self.show = home, show
        self.unsent: list[tuple[protocol.Envelope, bool]] = []  # (message, durable)
        self.failing = False

    def put(self, message: protocol.Envelope, durable: bool = True) -> None:
        """Queue a signed message and send what can be sent."""
        self.unsent.append((message, durable))
        self.flush()

    def flush(self) -> None:
        while self.unsent:
            message, durable = self.unsent[0]
            try:
                mailbox.send(self.home, message, fsync=durable)
            except SendError as exc:
                if not self.failing:
                    self.show(f"! could not send {message.type}, sent again until it works: {exc}")
                self.failing = True
                return
            except MultibotError as exc:
                self.show(f"! could not send {message.type}: {exc}")
            self.unsent.pop(0)
            self.failing = False
