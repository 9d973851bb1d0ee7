"""A calculator service and its client over request/reply, with typed errors.

    .venv/bin/python examples/calculator.py service             # terminal 1: answers until Ctrl-C
    .venv/bin/python examples/calculator.py client add 2 3      # terminal 2: prints 5
    .venv/bin/python examples/calculator.py client              # a tour, errors included
    .venv/bin/python examples/calculator.py demo                # both in one process, then exit

The service consumes the queue ``calc.requests``. A request is ``{"op": "add", "args":
[2, 3]}``; the reply is ``{"result": 5}`` or ``{"error": {"type": "DivisionByZero",
"message": "..."}}``. Errors are part of the reply, not a crash: the service answers
every request, and the client raises the exception class named by ``type``, so a caller
writes ``except DivisionByZero`` as if the call were local. Both sides share the classes
below; a type the client does not know becomes a plain ``CalcError``.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import signal
import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from _common import report_connection

import aiobus

QUEUE = "calc.requests"


class CalcError(Exception):
    """Base of the errors the service returns."""


class DivisionByZero(CalcError):
    pass


class UnknownOperation(CalcError):
    pass


class BadArguments(CalcError):
    pass


ERRORS: dict[str, type[CalcError]] = {
    cls.__name__: cls for cls in (DivisionByZero, UnknownOperation, BadArguments)
}


def divide(a: float, b: float) -> float:
    if b == 0:
        raise DivisionByZero(f"cannot divide {a} by zero")
    return a / b


OPERATIONS: dict[str, Callable[[float, float], float]] = {
    "add": operator.add,
    "multiply": operator.mul,
    "divide": divide,
}


# -- the service ------------------------------------------------------------------------


def compute(request: Any) -> float:
    """Evaluate one request body, raising a CalcError for anything wrong with it."""
    if not isinstance(request, dict):
        raise BadArguments(f"a request is a dict with 'op' and 'args', got {request!r}")
    op, args = request.get("op"), request.get("args")
    if op not in OPERATIONS:
        raise UnknownOperation(f"unknown operation {op!r}; try one of {', '.join(OPERATIONS)}")
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)):
        raise BadArguments(f"{op} takes two numbers, got {args!r}")
    return OPERATIONS[op](args[0], args[1])


async def serve(bus: aiobus.Bus, *,
                task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    async with bus.consume(QUEUE) as requests:  # registered with the broker from here on
        print(f"calculator service ready on queue {QUEUE}")
        task_status.started()
        async for msg in requests:
            try:
                reply: dict[str, Any] = {"result": compute(msg.body)}
            except CalcError as exc:
                reply = {"error": {"type": type(exc).__name__, "message": str(exc)}}
            print(f"service: {msg.body!r} -> {reply!r}")
            try:
                await msg.reply(reply)  # also acks the request
            except aiobus.LeaseError as exc:  # the broker restarted meanwhile
                print(f"service: could not reply ({exc})", file=sys.stderr)


async def stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        signum = await anext(signals)
    print(f"{signum.name}: stopping")
    scope.cancel()


async def run_service(bus: aiobus.Bus) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_signal, tg.cancel_scope)
        tg.start_soon(report_connection, bus)
        await serve(bus)
    print("calculator service stopped")


# -- the client -------------------------------------------------------------------------


async def calculate(bus: aiobus.Bus, op: str, *args: Any) -> float:
    """Ask the service; raise the CalcError subclass it names on failure."""
    reply = await bus.request(QUEUE, {"op": op, "args": list(args)}, timeout=5.0)
    if "error" in reply:
        error = reply["error"]
        raise ERRORS.get(error["type"], CalcError)(error["message"])
    result: float = reply["result"]
    return result


async def show(bus: aiobus.Bus, op: str, *args: Any) -> bool:
    call = f"{op}({', '.join(map(repr, args))})"
    try:
        print(f"{call} = {await calculate(bus, op, *args)}")
    except CalcError as exc:
        print(f"{call} raised {type(exc).__name__}: {exc}")
        return False
    return True


async def tour(bus: aiobus.Bus) -> None:
    await show(bus, "add", 2, 3)
    await show(bus, "multiply", 4, 2.5)
    await show(bus, "divide", 1, 0)
    await show(bus, "power", 2, 8)
    await show(bus, "add", "two", 3)


def number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # let the service say what is wrong with it


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="broker socket (default: the library's default)")
    parser.add_argument("role", choices=["service", "client", "demo"])
    parser.add_argument("call", nargs="*", help="client: OP A B, e.g. add 2 3")
    args = parser.parse_intermixed_args()  # --socket anywhere, as the aiobus command
    async with aiobus.connect(args.socket, name=f"calculator-{args.role}") as bus:
        if args.role == "service":
            await run_service(bus)
            return 0
        if args.role == "demo":
            async with anyio.create_task_group() as tg:
                await tg.start(serve, bus)
                await tour(bus)
                tg.cancel_scope.cancel()
            return 0
        try:
            if not args.call:
                await tour(bus)
                return 0
            op, *operands = args.call
            return 0 if await show(bus, op, *map(number, operands)) else 1
        except aiobus.RequestTimeout:
            print("no answer: start the service with"
                  " `.venv/bin/python examples/calculator.py service`", file=sys.stderr)
            return 2


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
