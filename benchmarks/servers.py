"""Starts and stops the brokers the benchmarks talk to, each as a child process.

- redis-server on a Unix socket in a temp dir, TCP off, no persistence (`--save ''
  --appendonly no`), and no output-buffer limit for pub/sub clients, so a slow subscriber
  is measured rather than disconnected; for W3's durable rows a second one with the AOF on
  and fsynced before every reply (`--appendonly yes --appendfsync always`), its files in a
  directory of its own under the temp dir;
- nats-server on 127.0.0.1 with a free port, JetStream storing under the temp dir, and
  write-deadline and pending limits raised for the same reason;
- the aiobus broker (`python -m aiobus.cli.broker --socket PATH --data-dir DIR`), its
  data directory always in the temp dir (never the user's default, and one per broker, as
  a data directory admits one broker); for W3's durable rows three more, one per
  `--fsync` policy; and one of the compiled build (`make compiled`), started with that
  build's interpreter, for the "compiled" rows (whose clients come from that build too);
- the minimal uvloop relay (`benchmarks/relay.py`);
- rabbitmq-server on 127.0.0.1 with free ports, its node data and logs under the temp dir,
  and its own epmd (Erlang's port mapper) in the foreground.

Each is ready when it accepts a connection (nats: sends INFO). `Servers` stops every one it
started by PID, SIGTERM then SIGKILL, in `close()`, which callers run in `finally`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _wait_unix(path: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                s.connect(path)
                return
        time.sleep(0.01)
    raise RuntimeError(f"{proc.args!r} not ready on {path}")


def _wait_nats(port: int, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            if s.recv(4) == b"INFO":
                return
        time.sleep(0.01)
    raise RuntimeError(f"nats-server not ready on port {port}")


# Debian's rabbitmq-server script without the wrapper in /usr/sbin, which would switch to
# the rabbitmq user; this one runs the node as a child of its shell and stops it on TERM.
RABBITMQ = "/usr/lib/rabbitmq/bin/rabbitmq-server"
COMPILED_VENV = "/tmp/aiobus-compiled/venv"  # the Makefile's COMPILED_DIR/venv

class Servers:
    """The servers of one benchmark run, in one short temp dir (AF_UNIX paths cap at 107)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="aiobus-bench-", dir="/tmp")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis_socket = ""
        self.nats_url = ""
        self.aiobus_socket = ""
        self.aiobus_compiled_socket = ""  # start_aiobus_compiled
        self.aiobus_compiled_site = ""  # its venv's site-packages: the compiled client
        self.redis_aof_socket = ""
        self.aiobus_durable: dict[str, str] = {}  # --fsync policy -> socket path
        self.aiobus_durable_compiled: dict[str, str] = {}  # the same, the compiled build's
        self._compiled_python = ""  # set by start_aiobus_compiled once checked
        self.relay_socket = ""
        self.amqp_url = ""
        self._next = 0

    def next_id(self) -> int:
        """A number for fresh names (queues, streams, subjects) in each case."""
        self._next += 1
        return self._next

    def path(self, stem: str) -> str:
        """A fresh socket path in the run's temp dir."""
        return os.path.join(self.dir, f"{stem}{self.next_id()}.sock")

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def _spawn(self, name: str, argv: list[str], tree: str = "",
               installed: bool = False) -> subprocess.Popen[bytes]:  # fmt: skip
        """Start ``argv``; with ``tree``, that source tree first on its ``PYTHONPATH``
        and as its working directory (to run another checkout's aiobus); ``installed``:
        the aiobus installed for argv's interpreter, so neither ``PYTHONPATH`` nor the
        working directory (``-m`` puts it first on sys.path) may bring in this checkout."""
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        env = {**os.environ, "PYTHONPATH": tree} if tree else None
        cwd = tree or None
        if installed:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            cwd = self.dir
        with log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, cwd=cwd)
        self.procs[name] = proc
        return proc

    def start_redis(self, name: str = "redis", *, aof: bool = False) -> str:
        """redis-server without persistence; with `aof`, the append-only file on and
        fsynced before replies go out (`appendfsync always`), in `<temp dir>/<name>`."""
        path = self.path("redis")
        directory = self.dir
        persistence = ["--appendonly", "no"]
        if aof:
            directory = os.path.join(self.dir, name)
            os.makedirs(directory)
            persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        proc = self._spawn(name, [
            "redis-server", "--port", "0", "--unixsocket", path, "--unixsocketperm", "700",
            "--save", "", *persistence, "--dir", directory, "--daemonize", "no",
            "--client-output-buffer-limit", "pubsub 0 0 0", "--maxclients", "10000",
            "--loglevel", "warning",
        ])  # fmt: skip
        _wait_unix(path, proc, time.monotonic() + 10)
        if aof:
            self.redis_aof_socket = path
        else:
            self.redis_socket = path
        return path

    def start_redis_aof(self) -> str:
        return self.start_redis("redis-aof", aof=True)

    def start_nats(self, name: str = "nats") -> str:
        port = free_port()
        store = os.path.join(self.dir, f"{name}-js")
        conf = os.path.join(self.dir, f"{name}.conf")
        Path(conf).write_text(
            f'listen: "127.0.0.1:{port}"\n'
            "max_payload: 8MB\n"  # the 1 MiB sweep point plus headers
            "max_pending: 1GB\n"  # slow subscribers buffer instead of being cut off
            'write_deadline: "60s"\n'
            f'jetstream {{ store_dir: "{store}", max_memory_store: 8GB }}\n'
        )
        proc = self._spawn(name, ["nats-server", "-c", conf])
        _wait_nats(port, proc, time.monotonic() + 10)
        self.nats_url = f"nats://127.0.0.1:{port}"
        return self.nats_url

    def start_rabbitmq(self, name: str = "rabbitmq") -> str:
        """RabbitMQ on 127.0.0.1 with everything under the run's temp dir. Erlang's port
        mapper (epmd) runs in the foreground as a process of ours, so it is stopped by
        PID like the rest (rabbitmq would otherwise start a daemon that outlives us)."""
        home = os.path.join(self.dir, name)
        os.makedirs(home)
        port, dist_port, epmd_port = free_port(), free_port(), free_port()
        epmd = self._spawn(f"{name}-epmd", ["epmd", "-port", str(epmd_port),
                                             "-address", "127.0.0.1"])  # fmt: skip
        Path(home, "plugins").write_text("[].\n")
        env = {**os.environ, "HOME": home, "RABBITMQ_NODENAME": f"bench{port}@localhost",
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(port),
               "RABBITMQ_DIST_PORT": str(dist_port), "ERL_EPMD_PORT": str(epmd_port),
               "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_MNESIA_BASE": f"{home}/mnesia",
               "RABBITMQ_LOG_BASE": f"{home}/log", "RABBITMQ_PID_FILE": f"{home}/pid",
               "RABBITMQ_ENABLED_PLUGINS_FILE": f"{home}/plugins",
               "RABBITMQ_CONFIG_FILE": f"{home}/rabbitmq"}  # fmt: skip
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        with log:  # stopped before epmd: procs keeps start order, close() reverses it
            proc = subprocess.Popen([RABBITMQ], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, env=env)  # fmt: skip
        self.procs[name] = proc
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the AMQP listener opens once boot completed
            if proc.poll() is not None or epmd.poll() is not None:
                raise RuntimeError("rabbitmq-server exited during start-up")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                self.amqp_url = f"amqp://guest:guest@127.0.0.1:{port}/"
                return self.amqp_url
            time.sleep(0.1)
        raise RuntimeError(f"rabbitmq-server not ready on port {port}")

    def start_aiobus(self, name: str = "aiobus", *, fsync: str = "",
                     data_dir: str = "", tree: str = "", python: str = "") -> str:  # fmt: skip
        """The broker, its data directory `<temp dir>/<name>-data` unless `data_dir` is
        given. With `fsync` (always, batch, never) it is one of W3's durable brokers;
        with `tree`, the aiobus of that source tree (`_spawn`); with `python`, that
        interpreter and the aiobus installed for it (the compiled build's venv)."""
        path = self.path("aiobus")
        argv = [python or sys.executable, "-m", "aiobus.cli.broker", "--socket", path,
                "--data-dir", data_dir or os.path.join(self.dir, f"{name}-data")]
        if fsync:
            argv += ["--fsync", fsync]
        proc = self._spawn(name, argv, tree, installed=bool(python))
        _wait_unix(path, proc, time.monotonic() + 60)  # a big journal replays first
        if fsync:
            (self.aiobus_durable_compiled if python else self.aiobus_durable)[fsync] = path
        elif not python:
            self.aiobus_socket = path
        return path

    def start_aiobus_compiled(self) -> str:
        """The compiled build's broker (`make compiled`, docs/performance.md): the
        interpreter of COMPILED_VENV (default /tmp/aiobus-compiled/venv), checked to import
        the compiled core and client. Its rows run their clients from that venv's
        site-packages too (`Worker.site`): what the compiled build buys, peer by peer."""
        python = os.path.join(os.environ.get("COMPILED_VENV", COMPILED_VENV), "bin", "python")
        if not os.path.exists(python):
            raise RuntimeError(f"no compiled build at {python}: run `make compiled` first")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = subprocess.run(
            [python, "-c", "import aiobus.broker.core as m, aiobus.client.connection as c;"
             " print(m.__file__); print(c.__file__)"],
            capture_output=True, text=True, cwd="/", env=env, timeout=60)
        files = where.stdout.split()
        if len(files) != 2 or not all(f.endswith(".so") for f in files):
            raise RuntimeError(f"{python} imports a pure-Python aiobus ({where.stdout.strip()}"
                               f"{where.stderr.strip()[-200:]}): the compiled build failed")
        path = self.start_aiobus("aiobus-compiled", python=python)
        self.aiobus_compiled_socket = path
        self._compiled_python = python
        # .../site-packages/aiobus/broker/core...so -> .../site-packages
        self.aiobus_compiled_site = os.path.dirname(os.path.dirname(os.path.dirname(files[0])))
        return path

    def start_aiobus_durable(self) -> dict[str, str]:
        """One broker per `--fsync` policy, each with a fresh data directory."""
        for policy in ("always", "batch", "never"):
            self.start_aiobus(f"aiobus-{policy}", fsync=policy)
        return self.aiobus_durable

    def start_aiobus_durable_compiled(self) -> dict[str, str]:
        """The compiled build's brokers for `--fsync always` and `batch` (after
        start_aiobus_compiled, which checks the build), each with a fresh data directory."""
        if not self._compiled_python:
            raise RuntimeError("no compiled build (make compiled; see the run's log)")
        for policy in ("always", "batch"):
            self.start_aiobus(f"aiobus-compiled-{policy}", fsync=policy,
                              python=self._compiled_python)
        return self.aiobus_durable_compiled

    def start_relay(self, name: str = "relay") -> str:
        path = self.path("relay")
        proc = self._spawn(name, [sys.executable, str(HERE / "relay.py"), "--socket", path])
        _wait_unix(path, proc, time.monotonic() + 10)
        self.relay_socket = path
        return path

    def stop(self, name: str) -> None:
        """SIGTERM, wait, then SIGKILL: always by the PID this object started."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def close(self) -> None:
        for name in reversed(list(self.procs)):  # a server before what it depends on
            self.stop(name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
