"""A policy of N rules for the benchmarks (issue 12: no slower with 100 rules loaded).

N - 2 rules grant other uids and groups verbs on names the benchmarks never use (so the
tries are populated); the last two grant the running user every queue and topic verb on
``>``. They name this uid, so even when the benchmark runs as root the broker matches
against the rules instead of passing root through (root is allowed everything only while
no rule names it).
"""

from __future__ import annotations

import os

QUEUE_VERBS = ["send", "consume", "declare", "admin"]
TOPIC_VERBS = ["publish", "subscribe"]


def write_policy(path: str, rules: int) -> str:
    """Write a policy of ``rules`` rules (at least 2) to ``path``; returns ``path``."""
    out = []
    for i in range(rules - 2):
        if i % 2:
            out.append(f'[[allow]]\nusers = [{20000 + i}]\ngroups = [{30000 + i}]\n'
                       f'verbs = ["{TOPIC_VERBS[i % 2]}"]\n'
                       f'topics = ["app{i}.>", "svc.{i}.*.events"]\n')
        else:
            out.append(f'[[allow]]\nusers = [{20000 + i}]\ngroups = [{30000 + i}]\n'
                       f'verbs = ["{QUEUE_VERBS[i % 4]}"]\n'
                       f'queues = ["app{i}.>", "svc.{i}.*", "bench.other{i}"]\n')
    uid = os.getuid()
    out.append(f'[[allow]]\nusers = [{uid}]\nverbs = {QUEUE_VERBS!r}\nqueues = [">"]\n')
    out.append(f'[[allow]]\nusers = [{uid}]\nverbs = {TOPIC_VERBS!r}\ntopics = [">"]\n')
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(out).replace("'", '"'))
    return path
