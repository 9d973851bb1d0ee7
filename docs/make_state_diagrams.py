"""Render the state diagrams of docs/PROTOCOL.md from transition tables.

As h11's make-state-diagrams.py draws its diagrams from the state machine's data, this
script keeps each diagram as a table of ``(source, target, event, code path)`` rows and
checks the table against the code before it writes anything:

* every member of the state ``Enum`` (``ConnState``, ``MsgState``) appears in its table,
  and no state outside the enum does except the listed pseudo-states;
* every code path (``Class.method``) a row names exists, so a renamed or removed
  transition breaks this script instead of leaving a stale diagram.

The broker has no declarative transition table (transitions are methods of
``BrokerCore`` and ``QueueRouter``; see the theory of operation in broker/queues.py), so
the rows below are transcribed from those methods, and name the method of each.

Usage::

    python docs/make_state_diagrams.py           # rewrite the generated blocks
    python docs/make_state_diagrams.py --check   # exit 1 if PROTOCOL.md is out of date

Each diagram is written between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->`` in PROTOCOL.md, as a Mermaid ``stateDiagram-v2`` block
(GitHub renders it) followed by the same transitions as a table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from aiobus.broker import core, queues  # noqa: E402

DOC = HERE / "PROTOCOL.md"
START = "[*]"


@dataclass(frozen=True)
class Diagram:
    name: str
    states: type[Enum] | None  # the enum the states must cover, if the code has one
    pseudo: tuple[str, ...]  # states drawn that the enum does not have
    rows: tuple[tuple[str, str, str, str], ...]  # (source, target, event, code path)


CONNECTION = Diagram(
    name="connection",
    states=core.ConnState,
    pseudo=("CLOSED",),
    rows=(
        (START, "HANDSHAKE", "socket accepted, handshake timer starts", "BrokerCore.connect"),
        ("HANDSHAKE", "OPEN", "HELLO version 1, broker sends WELCOME", "BrokerCore._on_hello"),
        ("HANDSHAKE", "CLOSED", "any other frame or a bad HELLO, CLOSE sent",
         "BrokerCore.receive"),
        ("HANDSHAKE", "CLOSED", "no HELLO within handshake_timeout, CLOSE sent",
         "BrokerCore._on_handshake_deadline"),
        ("OPEN", "CLOSED", "protocol violation (a second HELLO too), slow-consumer or shutdown,"
         " CLOSE sent", "BrokerCore.close"),
        ("HANDSHAKE", "CLOSED", "client closes the socket", "BrokerCore.disconnect"),
        ("OPEN", "CLOSED", "client closes the socket", "BrokerCore.disconnect"),
        ("CLOSED", START, "", "BrokerCore.disconnect"),
    ),
)

MESSAGE = Diagram(
    name="message",
    states=queues.MsgState,
    pseudo=(),
    rows=(
        (START, "READY", "SEND accepted (room, or the oldest ready one was dead-lettered)",
         "QueueRouter._accept"),
        (START, "DELAYED", "SEND with a delay accepted, until its due time",
         "QueueRouter._accept"),
        (START, "PARKED", "SEND to a full queue with overflow block", "QueueRouter._park"),
        (START, "GONE", "SEND to a full overflow dead-letter queue with nothing ready,"
         " dead-lettered at once", "QueueRouter.send"),
        ("PARKED", "READY", "room in the queue", "QueueRouter._admit_parked"),
        # drop_parked only forgets the message; its state is not rewritten.
        ("PARKED", "GONE", "its producer's connection closed, dropped unconfirmed",
         "QueueRouter.drop_parked"),
        ("PARKED", "GONE", "DELETE of the queue, SEND refused with no-such-queue",
         "QueueRouter.delete"),
        ("READY", "LEASED", "DELIVER to a consumer with a free slot and no zombie lease",
         "QueueRouter._deliver"),
        ("READY", "GONE", "TTL passed, expired (dead-lettered; a request is discarded)",
         "QueueRouter._on_ttl"),
        ("READY", "GONE", "oldest, SEND to a full overflow dead-letter queue",
         "QueueRouter._drop_oldest"),
        ("READY", "GONE", "PURGE or DELETE of the queue", "QueueRouter._forget_waiting"),
        ("LEASED", "GONE", "ACK or REPLY", "QueueRouter.ack"),
        ("LEASED", "GONE", "DELETE of the queue, the lease ends", "QueueRouter.delete"),
        ("LEASED", "GONE", "REJECT, dead-lettered as rejected", "QueueRouter.reject"),
        ("LEASED", "GONE", "failure reaching max_deliveries, dead-lettered",
         "QueueRouter._fail"),
        ("LEASED", "READY", "CANCEL releases it to the front, no attempt counted, TTL re-armed",
         "QueueRouter.remove_consumers"),
        ("LEASED", "READY", "failure without delay, to the front, attempt +1, TTL re-armed",
         "QueueRouter._requeue"),
        ("LEASED", "DELAYED", "failure with a delay, attempt +1", "QueueRouter._fail"),
        ("LEASED", "GONE", "failure or CANCEL release after its TTL passed,"
         " expired", "QueueRouter._expire"),
        ("DELAYED", "READY", "retry delay over, to the front, TTL re-armed",
         "QueueRouter._on_delay_done"),
        ("DELAYED", "READY", "due time of a SEND with a delay, to the back, TTL starts",
         "QueueRouter._on_delay_done"),
        ("DELAYED", "GONE", "PURGE or DELETE of the queue", "QueueRouter._forget_waiting"),
        ("DELAYED", "GONE", "TTL passed, expired (dead-lettered; a request is discarded)",
         "QueueRouter._on_ttl"),
        ("GONE", START, "", "QueueRouter.dead_letter"),
    ),
)

# Leases have no enum: HELD is a Lease in its consumer's ``leases`` with
# ``expired == False`` (``extended`` only moves it to a timer of its own), ZOMBIE one with
# ``expired == True`` (counted in ``Consumer.zombies``; while that is non-zero the
# consumer is kept out of the queue's ``available`` rotation), ENDED one removed from the
# books.
LEASE = Diagram(
    name="lease",
    states=None,
    pseudo=("HELD", "ZOMBIE", "ENDED"),
    rows=(
        (START, "HELD", "DELIVER, deadline = now + ack_timeout", "QueueRouter._deliver"),
        ("HELD", "HELD", "EXTEND, deadline = now + seconds", "QueueRouter.extend"),
        ("HELD", "ENDED", "ACK, NACK, REJECT or REPLY, answered OK", "QueueRouter._take"),
        ("HELD", "ZOMBIE", "deadline passed, the message fails (attempt +1), the consumer"
         " stalls", "QueueRouter._expire_lease"),
        ("HELD", "ENDED", "CANCEL (released) or connection lost (failed)",
         "QueueRouter.remove_consumers"),
        ("ZOMBIE", "ENDED", "any answer, ERROR lease-expired, slot freed; with no zombie"
         " left the consumer receives again", "QueueRouter._take"),
        ("ZOMBIE", "ENDED", "CANCEL or connection lost, slot freed",
         "QueueRouter.remove_consumers"),
        ("HELD", "ENDED", "DELETE of its queue; a later answer is lease-unknown",
         "QueueRouter.delete"),
        ("ZOMBIE", "ENDED", "DELETE of its queue, slot freed", "QueueRouter.delete"),
        ("ENDED", START, "", "QueueRouter._take"),
    ),
)

DIAGRAMS = (CONNECTION, MESSAGE, LEASE)
_CLASSES = {"BrokerCore": core.BrokerCore, "QueueRouter": queues.QueueRouter}


def check(diagram: Diagram) -> None:
    """Fail loudly when the table and the code disagree."""
    used = {s for row in diagram.rows for s in row[:2]} - {START}
    known = set(diagram.pseudo)
    if diagram.states is not None:
        members = {m.name for m in diagram.states}
        missing = members - used
        if missing:
            raise SystemExit(f"{diagram.name}: states without a transition: {sorted(missing)}")
        known |= members
    unknown = used - known
    if unknown:
        raise SystemExit(f"{diagram.name}: states not in the code: {sorted(unknown)}")
    for *_, path in diagram.rows:
        cls_name, _, method = path.partition(".")
        if not hasattr(_CLASSES[cls_name], method):
            raise SystemExit(f"{diagram.name}: {path} does not exist any more")


def render(diagram: Diagram) -> str:
    lines = ["```mermaid", "stateDiagram-v2"]
    for source, target, event, _ in diagram.rows:
        lines.append(f"    {source} --> {target}" + (f" : {event}" if event else ""))
    lines += ["```", "", "| from | to | on | code |", "|---|---|---|---|"]
    for source, target, event, path in diagram.rows:
        if event:
            src = "(new)" if source == START else f"`{source}`"
            lines.append(f"| {src} | `{target}` | {event} | `{path}` |")
    return "\n".join(lines)


def update(text: str, diagram: Diagram) -> str:
    begin = f"<!-- BEGIN GENERATED: {diagram.name} -->"
    end = f"<!-- END GENERATED: {diagram.name} -->"
    head, found, rest = text.partition(begin)
    if not found:
        raise SystemExit(f"{DOC.name} has no {begin!r} marker")
    _, found, tail = rest.partition(end)
    if not found:
        raise SystemExit(f"{DOC.name} has no {end!r} marker")
    note = ("<!-- generated by docs/make_state_diagrams.py from its transition tables;"
            " edit those, not this block -->")
    return f"{head}{begin}\n{note}\n{render(diagram)}\n{end}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if PROTOCOL.md is out of date instead of writing it")
    args = parser.parse_args()
    text = DOC.read_text(encoding="utf-8")
    new = text
    for diagram in DIAGRAMS:
        check(diagram)
        new = update(new, diagram)
    if args.check:
        if new != text:
            print(f"{DOC} is out of date: run python docs/make_state_diagrams.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
