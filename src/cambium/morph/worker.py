"""Tezzeret as a separate process: a compile worker that takes CompilationRequests from a consumer group on Oona and
answers with KernelReady, so a training process never compiles (MOR-5 at scale, over Redis/PostgreSQL/S3).

The loop, per round:
1. `claim` requests another worker of the group has held unacknowledged for `min_idle_s` (it died mid-job;
   a claimed request belongs to this worker from then on);
2. `read` fresh requests, blocking up to `poll_s` (in its first round after claiming nothing, first its own pending
   ones: it restarted under the same name);
3. for each: compile (content-addressed in Urza, so doing a job twice stores one kernel), publish the outcome on
   compilation.kernel.ready, and only then acknowledge the request.
A worker killed at any point therefore loses nothing: an unacknowledged request is compiled again by whoever claims it,
and a duplicate KernelReady names the same request and the same artifact (Kasmina keys outcomes by request id).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from cambium.morph.bus import Bus
from cambium.morph.compiler import Tezzeret
from cambium.morph.contracts import CompilationRequest
from cambium.morph.library import Urza

__all__ = ["GROUP", "WorkerStats", "run_compile_worker"]

GROUP = "tezzeret"
REQUESTS = "compilation.blueprint.submitted"


@dataclass
class WorkerStats:
    compiled: int
    failed: int
    claimed: int


def run_compile_worker(
    bus: Bus, urza: Urza, *, consumer: str, stop: threading.Event, min_idle_s: float = 30.0, poll_s: float = 1.0,
    benchmark_batch: int = 8, benchmark_repeats: int = 5,
    on_start: Callable[[CompilationRequest], None] | None = None,
) -> WorkerStats:
    """Serve compilations until `stop` is set; returns what this worker did."""
    tezzeret = Tezzeret(urza, benchmark_batch=benchmark_batch, benchmark_repeats=benchmark_repeats)
    claimed_total = 0
    restarted = True  # its own pending requests come back once, on the first round: later ones are acked in-round
    try:
        while not stop.is_set():
            claimed = bus.claim(REQUESTS, GROUP, consumer, min_idle_s)
            claimed_total += len(claimed)
            jobs = claimed + bus.read(REQUESTS, GROUP, count=8, redeliver=restarted and not claimed,
                                      consumer=consumer, block_s=0.0 if claimed else poll_s)
            restarted = restarted and bool(claimed)
            for message_id, request in jobs:
                if on_start is not None:
                    on_start(request)
                ready = tezzeret.outcome(request)
                bus.publish("compilation.kernel.ready", ready)
                bus.ack(REQUESTS, GROUP, message_id)
                if stop.is_set():
                    break
    finally:
        tezzeret.close()
    return WorkerStats(tezzeret.compiled, tezzeret.failed, claimed_total)

