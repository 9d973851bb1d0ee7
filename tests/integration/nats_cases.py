"""The behaviour-suite cases the NATS backend does not support, each with its reason
(docs/nats.md and the README's table list the same). ``conftest.py`` marks the ``[nats]``
case of each: XFAIL ones ``xfail(strict=True)`` (they run, and must fail: a fix shows up
as XPASS); SKIP ones do not run because they would spend seconds waiting for what NATS
does not do (SLOW: a quick test in test_nats.py pins the documented behaviour instead) or
depend on timing NATS does not make deterministic.

Not listed, because they are not collected for ``[nats]`` at all: tests that speak the
aiobus wire protocol to the broker's socket or depend on the broker process
(``conftest.unix_only``, with the reason at each).
"""

from __future__ import annotations

UNACKED = ("JetStream keeps a message whose lease expired ack-pending ('unacked', not"
           " 'ready') until it is delivered again, and the stalled consumer's own pull"
           " request may take it back at once")
BLOCK = ("overflow 'block' is the sending client's (it sends again while the stream is"
         " full), and JetStream keeps a message until it is acked: room is made by an ack,"
         " not by a delivery, and 'parked' counts that client's waiting sends only")
TTL = ("TTL expiry is not dead-lettered: JetStream removes an expired message"
       " (per-message TTL, whole seconds, at least 1 s)")
COUNTERS = ("JetStream keeps no lifetime counters of expired, discarded or dead-lettered"
            " messages: stats() reports them as None")
CONSUMERS = ("stats 'consumers' counts pull requests waiting on the server: a consumer"
             " whose prefetch is full has none (JetStream does not count pulling clients)")
REQUESTS = ("requests travel on core NATS to the queue's consumers, not through its"
            " stream: no max_length refusal, no expiry counted, no dead letter")

# Not run as xfail because they would spend seconds waiting for what never happens; the
# documented behaviour each stands for is pinned by a quick test in test_nats.py.
SLOW = "(pinned by test_nats.py) "
FLAKY = "(unit-tested in test_nats_map.py) "

XFAIL: dict[str, str] = {
    "test_overflow_block_makes_send_wait_for_room": BLOCK,
    "test_ttl_that_runs_out_after_release": TTL,
    "test_a_refused_request_fails_at_once_with_the_reason": REQUESTS,
    "test_stat_prometheus": ("stats() knows no connections and no broker process on NATS"
                             " (None: NaN in the Prometheus text)"),
    "test_stat_table_and_json": COUNTERS + "; NATS has no journal",
    "test_queue_list_purge_and_delete": CONSUMERS,
}

SKIP: dict[str, str] = {
    # It waits 20 s for another client's parked send to show in this client's stats.
    "test_parked_sends_of_a_producer_that_left_are_not_accepted": SLOW + BLOCK,
    "test_slow_subscriber_disconnect_policy_closes_only_that_connection": FLAKY + (
        "whether a reader falls behind a burst depends on how NATS delivers it, in one"
        " read or several"),
    "test_late_answers_are_logged_once_per_consumer_counted_and_the_loop_goes_on": (
        SLOW + UNACKED),
    "test_strict_answers_raise_what_the_broker_says": SLOW + UNACKED,
    "test_expired_lease_stalls_a_consumer_even_with_free_prefetch_slots": SLOW + (
        "the stalled consumer's own pending pull request receives the redelivered message"),
    "test_ttl_expiry_is_eager": SLOW + TTL,
    "test_ttl_still_expires_a_message_released_after_its_deadline": SLOW + TTL,
    "test_ttl_of_a_delayed_send_counts_from_its_due_time": SLOW + TTL,
    "test_expired_requests_are_discarded_not_dead_lettered": SLOW + REQUESTS,
    "test_presence_events_with_peer_credentials": SLOW + (
        "NATS has no presence events ($sys.client.*) and no peer credentials"),
    "test_ack_nowait_batches_and_reports_late_acks": (
        UNACKED + "; whether the consumer's own pull request took it again before the"
        " check varies from run to run"),
    "test_ack_timeout_redelivers_and_late_ack_fails_but_frees_the_slot": (
        "timing: the client times a lease from its receipt of the message, so on a"
        " loaded machine the server may redeliver before the client's deadline and a"
        " late ack is then taken (test_nats.py pins lease-expired with a margin)"),
}
