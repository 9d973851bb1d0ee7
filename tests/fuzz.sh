#!/bin/sh
# Model-based fuzzing, what `make fuzz` runs: the hypothesis state machines
# (tests/unit/test_model_queues.py, test_model_topics.py, test_model_durable.py,
# test_model_client_session.py and tests/integration/test_model_broker.py) with the "fuzz" profile of tests/conftest.py,
# round after round, each with fresh random examples, until FUZZ_SECONDS (default 600)
# have passed. A round is never cut short (that would orphan the integration test's
# broker), so the last one may end up to a round's length (a minute or two) late.
#
#   FUZZ_SECONDS=3600 PYTHON=.venv/bin/python sh tests/fuzz.sh
set -u
python=${PYTHON:-.venv/bin/python}
end=$(( $(date +%s) + ${FUZZ_SECONDS:-600} ))
log=$(mktemp "${TMPDIR:-/tmp}/aiobus-fuzz.XXXXXX")
trap 'rm -f "$log"' EXIT
round=0
while [ "$(date +%s)" -lt "$end" ]; do
    round=$((round + 1))
    echo "fuzz round $round ($(( end - $(date +%s) )) s left)"
    if ! AIOBUS_HYPOTHESIS_PROFILE=fuzz "$python" -m pytest -q -x --timeout=0 \
            tests/unit/test_model_queues.py tests/unit/test_model_topics.py \
            tests/unit/test_model_durable.py tests/unit/test_model_client_session.py \
            tests/integration/test_model_broker.py >"$log" 2>&1; then
        cat "$log"
        echo
        echo "make fuzz: round $round FAILED. The falsifying steps and a @reproduce_failure blob"
        echo "are printed above. Hypothesis saved the failing example in .hypothesis/ and replays"
        echo "it first on the next 'make fuzz' or 'make test' (keep that directory to keep it)."
        exit 1
    fi
    tail -n 1 "$log"
done
echo "make fuzz: $round rounds, no failure"
