"""The broker's fsync helper: a child process that runs the journal's fdatasyncs.

Why a process (commit.py, "The fsync helper"): an fdatasync in a worker thread of the
broker needs the broker's GIL to start and again to report back, and a busy loop holds it
for up to the switch interval each time; the helper has a GIL of its own, so a sync starts
when asked and its end waits for nothing but the loop reading one message.

Started by :class:`~aiobus.broker.syncers.ProcessSyncer` as ``python -I -S
fsync_helper.py FD THREADS`` (standard library only: it never imports aiobus), ``FD``
being its end of a ``SOCK_SEQPACKET`` socketpair. The exchange, one datagram each:

* the helper, once: ``b"ready"``;
* the broker, per sync: 8 bytes, the request's key (u64 LE), with the file descriptor to
  sync attached (``SCM_RIGHTS``: the helper syncs the broker's own open file, so a write
  error is reported to it exactly as to the broker, and a segment the broker closes
  meanwhile stays open here until its sync is done);
* the helper, per sync: the key and the fdatasync's errno (i32 LE; 0: it returned).

``THREADS`` threads serve requests, so that many syncs overlap (commit.py
``MAX_RUNNING``: two). The helper
exits when the broker's end of the socket closes: the broker closed its journal, exited
or was killed. It ignores SIGINT, SIGTERM and SIGHUP, which a terminal's Ctrl-C or
systemd's stop send to the whole process group: the broker may still sync while it
drains, and stops the helper itself.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import sys
import threading

REQUEST = struct.Struct("<Q")
REPLY = struct.Struct("<Qi")
READY = b"ready"


def serve(sock: socket.socket) -> None:
    """Answer requests until the broker's end closes."""
    while True:
        try:
            data, fds, _flags, _address = socket.recv_fds(sock, REQUEST.size, 1)
        except OSError:
            return
        if len(data) != REQUEST.size:  # b"": the broker's end closed (else not a broker)
            for fd in fds:
                os.close(fd)
            return
        error = 0 if fds else errno.EBADF
        try:
            if fds:
                os.fdatasync(fds[0])
        except OSError as exc:
            error = exc.errno or errno.EIO
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(REPLY.pack(REQUEST.unpack(data)[0], error))
        except OSError:
            return


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[1]))
    sock.send(READY)
    threads = [threading.Thread(target=serve, args=(sock,), name=f"fsync-{i}")
               for i in range(int(argv[2]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
