#!/usr/bin/env bash
# Installs what the benchmarks compare against, and is safe to run again:
#   - Debian's redis-server, nats-server and rabbitmq-server, each only when missing
#     (apt-get update runs first only when something has to be installed);
#   - the Python clients (the `bench` extra) into the venv given as $1, default .venv.
# Usage: bash benchmarks/setup.sh [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="$VENV/bin/python"
export DEBIAN_FRONTEND=noninteractive

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    # --no-install-recommends keeps redis-tools' extras out; the run starts its own servers.
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$PY" ]; then
    echo "setup: no python at $PY (make the venv first: make $VENV/.installed)" >&2
    exit 1
fi
# Skip pip when every client already imports: a second run stays offline and fast.
if ! "$PY" -c "import redis, hiredis, nats, zmq, aio_pika, matplotlib" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet -e '.[bench]'
fi
echo "setup: redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')," \
     "nats-server $(nats-server --version | sed 's/.*v//')," \
     "rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?')," \
     "python clients ok"
