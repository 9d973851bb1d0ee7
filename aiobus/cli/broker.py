"""``aiobus-broker``: the broker daemon.

Parses options, binds the socket (or takes one from systemd socket activation), installs
SIGINT/SIGTERM handlers that trigger a graceful shutdown, and runs the same
:class:`aiobus.Broker` that applications embed, on uvloop when it is installed.

The access policy (``--policy FILE``) is read here and injected into the broker, as
dbus-broker's launcher does: the broker itself never opens it. SIGHUP reads it again; a
file that does not parse is refused with its line and reason, and the policy in force
stays.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import grp
import logging
import os
import pwd
import signal
import socket
import sys

import anyio

from .. import __version__, systemd, web
from .._paths import default_data_dir, default_socket_path
from ..broker.core import DEFAULT_MAX_CONSUMERS
from ..broker.journal import JournalCorrupt
from ..broker.policy import Policy, PolicyError, parse
from ..broker.server import DEFAULT_BACKLOG, FSYNC_POLICIES, Broker
from ..broker.settings import (
    DEFAULT_DEDUP_SIZE,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_BUFFERED_BYTES_PER_UID,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_MAX_PARKED_BYTES,
    DEFAULT_MAX_PARKED_BYTES_PER_UID,
    DEFAULT_MAX_PENDING_OUTPUT,
    DEFAULT_MAX_QUEUED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUES_PER_UID,
    DEFAULT_MAX_SUBSCRIPTIONS_PER_UID,
    DEFAULT_MAX_UNACKED_PER_UID,
    MAX_DEDUP_SIZE,
)
from ..errors import BusError
from ..protocol import DEFAULT_MAX_FRAME
from ..units import UNITS, unit_file
from .logs import LOG_FORMATS, setup_logging

log = logging.getLogger("aiobus.broker")


def _octal(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode like 0600") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a permission mode (0000-0777)")
    return mode


def _group(text: str) -> int:
    try:
        return int(text) if text.isdigit() else grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def load_policy(path: str) -> Policy:
    """Read and parse the policy file at ``path``, resolving names with the system's user
    and group databases.

    Raises:
        PolicyError: naming the file, the line and the reason.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc}") from exc
    try:
        return parse(text, resolve_user=lambda name: pwd.getpwnam(name).pw_uid,
                     resolve_group=lambda name: grp.getgrnam(name).gr_gid)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc.reason}" if exc.line is None
                          else f"{path}: line {exc.line}: {exc.reason}") from exc


def _reload_policy(broker: Broker, path: str | None) -> None:
    """SIGHUP: use the policy file as it is now, or keep the old policy if it is bad."""
    if path is None:
        log.info("SIGHUP: no --policy file to reload")
        return
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        log.error("policy not reloaded, the previous one stays: %s", exc)
        return
    broker.set_policy(policy)
    log.info("policy reloaded from %s: %d rules", path, policy.rules)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _dedup_window(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError("must be from 0 (off) up to 1e9 seconds")
    return value


def _dedup_size(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_DEDUP_SIZE:
        raise argparse.ArgumentTypeError(f"must be from 0 (off) to {MAX_DEDUP_SIZE}")
    return value


def _http_address(text: str) -> str:
    try:
        web.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiobus-broker",
        description="Run the aiobus message broker on a Unix domain socket.",
    )
    parser.add_argument("--socket", metavar="PATH",
                        help="socket path (default: $AIOBUS_SOCKET, else"
                             " $XDG_RUNTIME_DIR/aiobus.sock, else /tmp/aiobus-<uid>/aiobus.sock;"
                             f" here: {default_socket_path()})")
    parser.add_argument("--socket-mode", type=_octal, default=0o600, metavar="MODE",
                        help="permissions of the socket file, octal (default 0600)")
    parser.add_argument("--socket-group", type=_group, default=None, metavar="GROUP",
                        help="group owning the socket file (name or gid); with --socket-mode"
                             " 0660, its members may connect")
    parser.add_argument("--policy", metavar="FILE", default=None,
                        help="access policy (TOML): which users and groups may send,"
                             " consume, publish, subscribe, declare and administer which"
                             " names; anything not granted is refused. Reloaded on SIGHUP."
                             " Default: none, the socket's mode is the access control")
    parser.add_argument("--max-frame", type=_positive_int, default=DEFAULT_MAX_FRAME,
                        metavar="BYTES",
                        help=f"largest frame accepted (default {DEFAULT_MAX_FRAME})")
    parser.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="time a new connection has to say HELLO (default 5)")
    parser.add_argument("--max-consumers", type=_positive_int, default=DEFAULT_MAX_CONSUMERS,
                        metavar="N",
                        help="consumers one connection may hold (default"
                             f" {DEFAULT_MAX_CONSUMERS}); one more gets QuotaExceeded")
    parser.add_argument("--max-pending-output", type=_positive_int,
                        default=DEFAULT_MAX_PENDING_OUTPUT, metavar="BYTES",
                        help="unread bytes a connection may have waiting, over all its"
                             " subscriptions and consumers; above it its subscriptions act as"
                             " if out of credit and its consumers get nothing new, until it"
                             f" reads (default {DEFAULT_MAX_PENDING_OUTPUT})")
    parser.add_argument("--max-parked-bytes", type=_positive_int,
                        default=DEFAULT_MAX_PARKED_BYTES, metavar="BYTES",
                        help="bytes of a connection's sends waiting for room in full"
                             " 'block' queues at which it is no longer read, until half are"
                             f" admitted (default {DEFAULT_MAX_PARKED_BYTES})")
    parser.add_argument("--max-connections-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_CONNECTIONS_PER_UID, metavar="N",
                        help="connections the clients of one uid may have open; one more is"
                             " closed with quota-exceeded (default"
                             f" {DEFAULT_MAX_CONNECTIONS_PER_UID})")
    parser.add_argument("--max-queues-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_QUEUES_PER_UID, metavar="N",
                        help="queues the clients of one uid may create (by use or DECLARE);"
                             " one more is refused with QuotaExceeded (default"
                             f" {DEFAULT_MAX_QUEUES_PER_UID})")
    parser.add_argument("--max-subscriptions-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_SUBSCRIPTIONS_PER_UID, metavar="N",
                        help="topic subscriptions the clients of one uid may hold; one more"
                             " is refused with QuotaExceeded (default"
                             f" {DEFAULT_MAX_SUBSCRIPTIONS_PER_UID})")
    parser.add_argument("--max-unacked-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_UNACKED_PER_UID, metavar="N",
                        help="unacked messages the consumers of one uid may hold, counted as"
                             " the sum of their prefetch; a CONSUME past it is refused with"
                             f" QuotaExceeded (default {DEFAULT_MAX_UNACKED_PER_UID})")
    parser.add_argument("--max-queued-bytes-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_QUEUED_BYTES_PER_UID, metavar="BYTES",
                        help="bytes the messages in the queues one uid's clients created"
                             " may hold (each its encoded size plus 64); a SEND past it is"
                             " refused with QuotaExceeded (default"
                             f" {DEFAULT_MAX_QUEUED_BYTES_PER_UID})")
    parser.add_argument("--max-parked-bytes-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_PARKED_BYTES_PER_UID, metavar="BYTES",
                        help="bytes of SENDs waiting for room in full 'block' queues over all"
                             " the connections of one uid; a SEND that would park past it is"
                             " refused with QuotaExceeded (default"
                             f" {DEFAULT_MAX_PARKED_BYTES_PER_UID})")
    parser.add_argument("--max-buffered-bytes-per-uid", type=_positive_int,
                        default=DEFAULT_MAX_BUFFERED_BYTES_PER_UID, metavar="BYTES",
                        help="bytes of frames still arriving (incomplete) over all the"
                             " connections of one uid; a read past it closes that connection"
                             " with quota-exceeded (default"
                             f" {DEFAULT_MAX_BUFFERED_BYTES_PER_UID})")
    parser.add_argument("--backlog", type=_positive_int, default=DEFAULT_BACKLOG, metavar="N",
                        help="listen backlog: connections waiting to be accepted (default"
                             f" {DEFAULT_BACKLOG}; capped by net.core.somaxconn)")
    parser.add_argument("--dedup-window", type=_dedup_window, default=DEFAULT_DEDUP_WINDOW,
                        metavar="SECONDS",
                        help="a resent SEND (same client_id and seq) within this many seconds"
                             " of the first is confirmed and not queued again (default"
                             f" {DEFAULT_DEDUP_WINDOW:g}; 0: off)")
    parser.add_argument("--dedup-size", type=_dedup_size, default=DEFAULT_DEDUP_SIZE,
                        metavar="N",
                        help="ids each queue remembers for that, at most; the oldest go"
                             f" first (default {DEFAULT_DEDUP_SIZE}; 0: off)")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="where durable queues are journaled (created 0700; default:"
                             " $XDG_STATE_HOME/aiobus, else ~/.local/state/aiobus; here:"
                             f" {default_data_dir()})")
    parser.add_argument("--fsync", choices=FSYNC_POLICIES, default="always",
                        help="always: a durable send is confirmed once on disk (one"
                             " fdatasync per loop turn covers all of its sends); batch:"
                             " fdatasync every --fsync-interval, confirmed once written;"
                             " never: the OS decides (default always)")
    parser.add_argument("--fsync-interval", type=_positive_int, default=100, metavar="MS",
                        help="milliseconds between fdatasyncs with --fsync batch (default 100)")
    parser.add_argument("--repair", action="store_true",
                        help="if a journal segment is damaged, move it aside, log exactly"
                             " which messages were lost, and start (without it the broker"
                             " refuses to start, naming the file and offset)")
    parser.add_argument("--drain-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="on SIGTERM, seconds consumers get to answer the messages they"
                             " hold before their connections close (default 5)")
    parser.add_argument("--http", type=_http_address, default=None, metavar="[HOST:]PORT",
                        help="serve Prometheus /metrics and the web dashboard on this"
                             " address (a bare PORT: 127.0.0.1; only an explicit HOST is"
                             " served beyond loopback); admin actions need the token"
                             " written to <socket>.token. Needs the extra aiobus-ipc[web]."
                             " Default: off")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="event loop: uvloop when installed (auto, the default), or the"
                             " standard library's; both behave the same, uvloop is faster")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="least severe records logged (default INFO; DEBUG adds each"
                             " connection opened, connected and closed: name, pid, uid)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default), or json: one object per line with time,"
                             " level, logger, message and the record's fields (conn,"
                             " client, pid, uid), for journald or Loki")
    parser.add_argument("--version", action="version", version=f"aiobus-broker {__version__}")
    parser.add_argument("--print-unit", choices=UNITS, metavar="service|socket",
                        help="print the systemd unit aiobus.service (ExecStart= this"
                             " installation's aiobus-broker, by absolute path) or"
                             " aiobus.socket, and exit; see contrib/systemd/README.md")
    return parser


def _activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation), if any."""
    sockets = systemd.listen_fds()
    for sock in sockets[1:]:
        log.warning("ignoring extra socket fd %d passed by the service manager", sock.fileno())
        sock.close()
    if not sockets:
        return None
    sock = sockets[0]
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise BusError("the socket passed by the service manager is not a Unix stream socket")
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> None:
    """Run a broker until SIGINT or SIGTERM, then shut it down gracefully.

    Under systemd: serves the socket passed by socket activation (``LISTEN_FDS``) instead
    of binding ``--socket``, and reports ``READY=1`` / ``STOPPING=1`` to ``NOTIFY_SOCKET``.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signo in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signo, stop.set)
    policy = load_policy(args.policy) if args.policy is not None else None
    if policy is not None:
        log.info("policy loaded from %s: %d rules", args.policy, policy.rules)
    inherited = _activated_socket()
    if inherited is not None and args.socket:
        log.info("serving the socket passed by the service manager; --socket is ignored")
    broker = Broker(
        args.socket,
        socket_mode=args.socket_mode,
        max_frame=args.max_frame,
        handshake_timeout=args.handshake_timeout,
        max_consumers=args.max_consumers,
        max_pending_output=args.max_pending_output,
        max_parked_bytes=args.max_parked_bytes,
        max_connections_per_uid=args.max_connections_per_uid,
        max_queues_per_uid=args.max_queues_per_uid,
        max_subscriptions_per_uid=args.max_subscriptions_per_uid,
        max_unacked_per_uid=args.max_unacked_per_uid,
        max_queued_bytes_per_uid=args.max_queued_bytes_per_uid,
        max_parked_bytes_per_uid=args.max_parked_bytes_per_uid,
        max_buffered_bytes_per_uid=args.max_buffered_bytes_per_uid,
        backlog=args.backlog,
        data_dir=args.data_dir or default_data_dir(),
        fsync=args.fsync,
        fsync_interval=args.fsync_interval / 1000,
        repair=args.repair,
        drain_timeout=args.drain_timeout,
        dedup_window=args.dedup_window,
        dedup_size=args.dedup_size,
        sock=inherited,
        policy=policy,
        socket_group=args.socket_group,
        http=args.http,
    )
    try:
        async with anyio.create_task_group() as tasks:  # the broker's services run in it
            await tasks.start(broker.serve)
            loop.add_signal_handler(signal.SIGHUP, _reload_policy, broker, args.policy)
            where = broker.path or "the socket passed by the service manager"
            systemd.notify(f"READY=1\nSTATUS=listening on {where}\nMAINPID={os.getpid()}")
            await stop.wait()
            log.info("signal received, shutting down")
            systemd.notify("STOPPING=1\nSTATUS=shutting down")
            await broker.aclose()
    except BaseExceptionGroup as group:  # the task group's: a start-up error, usually
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None  # as main() reports it
        raise
    finally:
        for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signo)


def _tune_gc() -> None:
    """Collect young objects less often. Every queued message and lease is a tracked
    object, and with CPython's default gen-0 threshold (700) the collector ran every few
    hundred messages and rescanned a growing heap; the broker's hot path makes no
    reference cycles, so larger generations cost little memory. Measured: queue
    send->consume->ack through a broker process, +18% msgs/s (docs/performance.md).
    Only the daemon does this; an embedded Broker leaves its host's collector alone."""
    gc.freeze()  # what was imported at start-up is never garbage: stop rescanning it
    gc.set_threshold(50_000, 50, 100)


# The GIL switch interval with --fsync always (CPython's default is 5 ms).
SYNC_SWITCH_INTERVAL = 0.0005


def _tune_switch_interval(fsync: str) -> None:
    """With ``--fsync always`` every loop turn's confirmations wait for an fdatasync. It
    runs in the fsync helper, a process of its own (broker/syncers.py); but where that
    cannot start, or has died, it runs in a worker thread, which needs the GIL twice a
    sync: to start, and to hand the result back. While the loop is busy it waits up to
    the switch interval each time (5 ms by default), where the fdatasync itself takes
    0.1-0.6 ms here: measured inside the broker under W3, the hand-offs' p90 was 1.5-2 ms
    each. At 0.5 ms, W3's durable `always` row ran 1.2x faster (docs/performance.md,
    "The sync thread and the GIL"). With no thread waiting for the GIL the interval
    changes nothing. Only the daemon does this, as with the collector: an embedded
    Broker leaves its host's interpreter alone (README, "Durability")."""
    if fsync == "always":
        sys.setswitchinterval(SYNC_SWITCH_INTERVAL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_unit is not None:
        print(unit_file(args.print_unit), end="")
        return 0
    _tune_gc()
    _tune_switch_interval(args.fsync)
    setup_logging(args.log_level, args.log_format)
    runner = asyncio.run  # stdlib loop: slower, same behaviour
    if args.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                print("aiobus-broker: --loop uvloop: uvloop is not installed", file=sys.stderr)
                return 1
        else:
            runner = uvloop.run
    try:
        runner(serve(args))
    except JournalCorrupt as exc:
        print(f"aiobus-broker: {exc}. Start with --repair to move the damaged segment"
              " aside and log exactly which messages were lost.", file=sys.stderr)
        return 1
    except BusError as exc:
        print(f"aiobus-broker: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"aiobus-broker: cannot listen on {args.socket or default_socket_path()}: {exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
