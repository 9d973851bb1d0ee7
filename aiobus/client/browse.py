"""What ``Bus.peek`` returns: a queue's ready messages, read without consuming them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BodyDecodeError
from ..protocol import BodyKind, decode_body

__all__ = ["PeekResult", "PeekedMessage"]


@dataclass(frozen=True, slots=True)
class PeekedMessage:
    """A message as PEEK shows it: nothing is leased, so there is nothing to answer.

    Attributes:
        id, queue, headers, timestamp: as on a consumed :class:`aiobus.Message` (a dead
            letter's ``x-dead-*`` headers included).
        raw_body: the body's bytes, cut to the ``max_body`` asked for.
        kind: 0 raw bytes, 1 msgpack.
        size: the full body's length in bytes.
    """

    id: str
    queue: str
    raw_body: bytes
    kind: int
    headers: dict[str, str]
    timestamp: float
    size: int

    @property
    def truncated(self) -> bool:
        """Whether ``raw_body`` is only the start of the body."""
        return len(self.raw_body) < self.size

    @property
    def body(self) -> Any:
        """The body as sent (bytes, or the value a msgpack body encodes).

        Raises:
            BodyDecodeError: a msgpack body that is cut (``truncated``) or was encoded
                badly; ``raw_body`` has its bytes.
        """
        if self.kind == BodyKind.RAW:
            return self.raw_body
        if self.truncated:
            raise BodyDecodeError(f"message {self.id}: only {len(self.raw_body)} of its"
                                  f" {self.size} bytes were read; ask for a larger max_body")
        try:
            return decode_body(self.raw_body, self.kind)
        except Exception as exc:
            raise BodyDecodeError(f"message {self.id} has a body its producer did not encode"
                                  f" correctly ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def from_wire(cls, entry: list[Any]) -> PeekedMessage:
        (mid, queue, body, kind, headers, timestamp), size = entry
        return cls(mid, queue, body, kind, headers or {}, timestamp, size)


@dataclass(frozen=True, slots=True)
class PeekResult:
    """``messages`` from position ``offset`` of the queue's ``ready`` messages."""

    messages: list[PeekedMessage]
    ready: int
    offset: int

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> PeekResult:
        return cls([PeekedMessage.from_wire(e) for e in result["messages"]],
                   result["ready"], result["offset"])
