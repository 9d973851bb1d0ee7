"""Process plumbing for the benchmarks: every client role runs in a process of its own.

Theory of operation. A *case* is one measurement: a few worker processes (producers,
consumers, servers such as an RPC responder) talking through a broker that `servers.py`
started. The harness forks the workers (the "fork" start method, so the client libraries
imported here once cost nothing per run; a worker whose libraries come from elsewhere,
the compiled build's, is spawned), and drives each over a `multiprocessing.Pipe`:

    worker -> ("ready", None)       its subscription or connection is live (not for steps)
    harness -> "go"                 sent to everyone once all are ready
    worker -> ("result", dict)      producers and consumers when done
    harness -> "stop"               then to servers, which answer with their result
    worker -> ("error", traceback)  instead of a result; the case fails, the run goes on

Times are `time.monotonic_ns()` (CLOCK_MONOTONIC), one clock for every process on the
machine, so a producer's first send and a consumer's last receive can be subtracted.
Each case has a deadline; whatever is still alive at the end is killed by its PID.

Consumers that compete for one queue share an array of counters (one slot each, no lock:
each process writes only its own slot), so each knows when the whole run has arrived.
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import io
import multiprocessing
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvloop

CTX = multiprocessing.get_context("fork")
SPAWN = multiprocessing.get_context("spawn")


class CaseFailed(Exception):
    """A worker raised, timed out or exited without a result."""


@dataclass
class Worker:
    """One process of a case: `fn(ctl, **params)`, async or plain."""

    fn: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    # "producer", "consumer", "server" (stopped when the rest end), or "step": a prepare or
    # cleanup job that just runs and returns, with no ready or go.
    role: str = "producer"
    # A site-packages directory to import the client libraries from first (the compiled
    # build's venv: its aiobus). Such a worker is spawned, not forked: a fork would keep
    # the modules this process imported.
    site: str = ""


@dataclass
class Case:
    """One measurement: optional prepare and cleanup steps around the workers."""

    workers: list[Worker]
    prepare: list[Worker] = field(default_factory=list)
    cleanup: list[Worker] = field(default_factory=list)
    expected: int = 0  # deliveries the consumers should see in all (0: as many as sent)
    timeout: float = 60.0
    on_ready: Callable[[], None] | None = None  # runs in the harness once all are ready


class Control:
    """The worker's end of the pipe, and its tally of received messages."""

    def __init__(self, conn: Any, counters: Any, slot: int, timeout: float) -> None:
        self._deadline = time.monotonic() + timeout - 2.0  # leave time to report
        self._conn = conn
        self._counters = counters
        self._slot = slot
        self._go = asyncio.Event()
        self._stop = asyncio.Event()
        self.count = 0  # messages this process received
        self.first_ns = 0  # monotonic time of the first receive (or send)
        self.last_ns = 0  # monotonic time of the last receive
        self.stopping = False  # set when the receive loop should end

    # -- readiness ---------------------------------------------------------------------------
    def send_ready(self) -> None:
        self._conn.send(("ready", None))

    def _on_readable(self) -> None:
        message = self._conn.recv()
        if message == "go":
            self._go.set()
        elif message == "stop":
            self._stop.set()

    def watch_pipe(self) -> None:
        asyncio.get_running_loop().add_reader(self._conn.fileno(), self._on_readable)

    async def ready(self) -> None:
        """Report ready, then wait for the harness's go."""
        self.send_ready()
        await self.wait_go()

    async def wait_go(self) -> None:
        await self._go.wait()

    def go_nowait(self) -> bool:
        return self._go.is_set()

    async def wait_stop(self) -> None:
        await self._stop.wait()

    def ready_sync(self) -> None:
        """Ready and go for a worker without an event loop."""
        self.send_ready()
        if self._conn.recv() != "go":
            raise CaseFailed("expected go")

    # -- counting ----------------------------------------------------------------------------
    def total(self) -> int:
        """Messages received by every consumer sharing this case's counters."""
        self._counters[self._slot] = self.count
        return sum(self._counters)

    async def run_until(
        self,
        loop: Awaitable[Any],
        want: int,
        *,
        shared: bool = False,
        idle: float | None = None,
    ) -> None:
        """Run a receive loop until `want` arrived (here, or over all consumers if shared).

        With `idle`, also stop when nothing new arrived for that long after the first message
        (pub/sub may drop; the run then reports what it got).
        """
        task = asyncio.ensure_future(loop)
        seen, seen_at = -1, time.monotonic()
        try:
            while not task.done():
                got = self.total() if shared else self.count
                if got >= want:
                    break
                now = time.monotonic()
                if got != seen:
                    seen, seen_at = got, now
                elif idle is not None and got > 0 and now - seen_at > idle:
                    break
                if now > self._deadline:
                    stack = io.StringIO()
                    task.print_stack(file=stack)
                    raise TimeoutError(f"received {got} of {want} (this process: {self.count});"
                                       f" the receive loop was at:\n{stack.getvalue()}")
                await asyncio.sleep(0.002)
        finally:
            await self._end(task)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _end(self, task: asyncio.Future[Any]) -> None:
        """Cancel the loop, with `stopping` set first: some clients (redis-py's pipeline)
        swallow a cancellation mid-read, so loops that use them also check the flag."""
        self.stopping = True
        for _ in range(10):
            if task.done():
                return
            task.cancel()
            await asyncio.wait({task}, timeout=0.2)
        raise RuntimeError("the receive loop ignored cancellation")

    def received(self, **extra: Any) -> dict[str, Any]:
        """The usual consumer result."""
        return {"count": self.count, "first_ns": self.first_ns, "last_ns": self.last_ns, **extra}


def _child(conn: Any, worker: Worker, counters: Any, slot: int, timeout: float) -> None:
    # A worker still running just before its deadline prints every thread's stack to
    # stderr, so a hang says where it hangs before the harness kills it.
    faulthandler.dump_traceback_later(max(1.0, timeout - 1.0))
    ctl = Control(conn, counters, slot, timeout)
    try:
        if inspect.iscoroutinefunction(worker.fn):

            async def main() -> Any:
                ctl.watch_pipe()
                return await worker.fn(ctl, **worker.params)

            result = uvloop.run(main())
        else:
            result = worker.fn(ctl, **worker.params)
        conn.send(("result", result or {}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class _Running:
    def __init__(self, worker: Worker, counters: Any, slot: int, deadline: float) -> None:
        self.worker = worker
        self.conn, child_conn = CTX.Pipe()
        timeout = deadline - time.monotonic()
        if worker.site:
            # A spawned child takes this process's sys.path (multiprocessing.spawn's
            # preparation data): put the site first for as long as it starts.
            self.process = SPAWN.Process(target=_child,
                                         args=(child_conn, worker, counters, slot, timeout))
            sys.path.insert(0, worker.site)
            try:
                self.process.start()
            finally:
                sys.path.remove(worker.site)
        else:
            self.process = CTX.Process(target=_child,
                                       args=(child_conn, worker, counters, slot, timeout))
            self.process.start()
        child_conn.close()
        self.result: dict[str, Any] | None = None

    def expect(self, kind: str, deadline: float) -> Any:
        name = getattr(self.worker.fn, "__name__", "worker")
        left = deadline - time.monotonic()
        if left <= 0 or not self.conn.poll(left):
            raise CaseFailed(f"{name}: timed out waiting for {kind}")
        try:
            got, payload = self.conn.recv()
        except EOFError:
            raise CaseFailed(f"{name}: exited (code {self.process.exitcode})") from None
        if got == "error":
            raise CaseFailed(f"{name} failed:\n{payload}")
        if got != kind:
            raise CaseFailed(f"{name}: expected {kind}, got {got}")
        return payload

    def reap(self) -> None:
        """Join, and kill by PID whatever is still running."""
        self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.conn.close()


def _run_all(workers: list[Worker], deadline: float, counters: Any,
             on_ready: Callable[[], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    running: list[_Running] = []
    try:
        for slot, worker in enumerate(workers):
            running.append(_Running(worker, counters, slot, deadline))
        live = [r for r in running if r.worker.role != "step"]
        for r in live:
            r.expect("ready", deadline)
        if on_ready is not None:
            on_ready()
        for r in live:
            r.conn.send("go")
        for r in running:
            if r.worker.role != "server":
                r.result = r.expect("result", deadline)
        for r in running:
            if r.worker.role == "server":
                r.conn.send("stop")
                r.result = r.expect("result", min(deadline, time.monotonic() + 5.0))
        return [r.result or {} for r in running]
    finally:
        for r in running:
            r.reap()


def run_case(case: Case) -> list[dict[str, Any]]:
    """Run prepare, the workers, and cleanup; return the workers' results in order."""
    deadline = time.monotonic() + case.timeout
    counters = CTX.Array("q", max(1, len(case.workers)), lock=False)
    try:
        for step in case.prepare:
            _run_all([step], deadline, counters)
        return _run_all(case.workers, deadline, counters, case.on_ready)
    finally:
        for step in case.cleanup:
            try:
                _run_all([step], time.monotonic() + 15.0, counters)
            except CaseFailed:
                pass  # best effort: the next case uses fresh names anyway


def throughput(results: list[dict[str, Any]], case: Case) -> dict[str, float]:
    """Messages/s from the first send anywhere to the last receive anywhere."""
    producers = [r for r, w in zip(results, case.workers, strict=True) if w.role == "producer"]
    consumers = [r for r, w in zip(results, case.workers, strict=True) if w.role == "consumer"]
    first = min(r["first_ns"] for r in producers)
    last = max(r["last_ns"] for r in consumers)
    got = sum(r["count"] for r in consumers)
    sent = sum(r.get("sent", 0) for r in producers)
    seconds = max(last - first, 1) / 1e9
    lost = (case.expected or sent) - got
    return {"msgs": got, "sent": sent, "lost": lost, "seconds": seconds, "rate": got / seconds}
