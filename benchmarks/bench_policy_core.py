"""The access check's cost on the broker core's hot path, in process (no sockets).

    python benchmarks/bench_policy_core.py [--frames 200000] [--repeats 7] [--rules 100]

Drives :class:`BrokerCore` directly with a sink that discards: unconfirmed SENDs to one
queue, and PUBLISHes to one topic nobody subscribes to, and reports ns per frame (the
fastest of ``--repeats`` runs, CPU time: the machine's other load moves wall-clock
numbers far more than the few ns under test). Setups alternate within each repeat:
no policy, then a policy of ``--rules`` rules (policy_file.py) naming this uid. Run it
against another tree with PYTHONPATH to compare before/after (a core without policies
runs the first setup only).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from typing import Any

import msgpack

from aiobus.broker.core import BrokerCore
from aiobus.protocol import FrameDecoder, Op


class NullSink:
    def send(self, conn: int, frame: list[Any]) -> None: ...
    def send_raw(self, conn: int, data: bytes) -> None: ...
    def confirm(self, conn: int, rid: int) -> None: ...
    def event(self, conn: int, sid: int, message: bytes, dropped: int) -> None: ...
    def close(self, conn: int, code: str, message: str) -> None: ...
    def set_reading(self, conn: int, reading: bool) -> None: ...


def frames(raw: list[Any], n: int) -> list[Any]:
    """``n`` copies of ``raw`` as the decoder yields them (fresh strings each, as from
    the wire: their hashes are not cached yet)."""
    decoder, chunk = FrameDecoder(), msgpack.packb(raw, use_bin_type=True) * 1000
    out: list[Any] = []
    while len(out) < n:
        out.extend(decoder.feed(chunk))
    return out[:n]


def run(policy: Any, send: list[Any], publish: list[Any]) -> tuple[float, float]:
    options = {"policy": policy} if policy is not None else {}
    core = BrokerCore(NullSink(), id_prefix="b", **options)
    core.connect(1, os.getpid(), os.getuid(), os.getgid(), 0.0)
    core.receive(1, [int(Op.HELLO), 1, {}], 0.0)  # as decoded: a plain int
    results = []
    for batch in (send, publish):
        start = time.process_time_ns()
        receive = core.receive
        for frame in batch:
            receive(1, frame, 1.0)
        results.append((time.process_time_ns() - start) / len(batch))
    queued = core.stats()["queues"]["bench.q"]["ready"]
    assert queued == len(send), f"only {queued} of {len(send)} SENDs were queued"
    assert core.topics.published == len(publish), "PUBLISHes were refused"
    return results[0], results[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rules", type=int, default=100)
    args = parser.parse_args()
    send = frames([Op.SEND, 0, "bench.q", b"x" * 128, 0, None, None, None], args.frames)
    publish = frames([Op.PUBLISH, "bench.t", b"x" * 128, 0, None], args.frames)
    setups: dict[str, Any] = {"no policy": None}
    if "policy" in inspect.signature(BrokerCore).parameters:
        from policy_file import write_policy

        from aiobus.broker.policy import parse

        with tempfile.TemporaryDirectory() as tmp:
            path = write_policy(os.path.join(tmp, "p.toml"), args.rules)
            with open(path, encoding="utf-8") as file:
                text = file.read()
        setups[f"{args.rules}-rule policy"] = parse(text, resolve_user=int,
                                                    resolve_group=int)
    best: dict[str, list[float]] = {name: [float("inf")] * 2 for name in setups}
    for _ in range(args.repeats):
        for name, policy in setups.items():
            for i, value in enumerate(run(policy, send, publish)):
                best[name][i] = min(best[name][i], value)
    print(f"{sys.modules['aiobus'].__file__}: ns per frame, best of {args.repeats}")
    for name, (s, p) in best.items():
        print(f"{name:<18} SEND {s:7.0f}   PUBLISH {p:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
