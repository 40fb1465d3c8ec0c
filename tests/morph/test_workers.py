"""Compile workers (cambium.morph.worker) on the in-process bus: they claim what a dead worker held, compile each
request once into the library, answer on compilation.kernel.ready and acknowledge only after answering. The same loop
runs in separate processes over Redis in tests/integration/test_distributed.py."""

from __future__ import annotations

import threading
import time

import pytest
from tests.morph._harness import config, linear_host

from cambium.core.errors import ConfigError
from cambium.morph.bus import InProcessBus
from cambium.morph.contracts import CompilationRequest, CompileSettings, KernelStatus
from cambium.morph.library import Urza
from cambium.morph.loop import assemble
from cambium.morph.worker import GROUP, REQUESTS, run_compile_worker


def test_a_worker_claims_a_dead_workers_requests_and_answers_each(tmp_path) -> None:
    urza, bus = Urza.local(tmp_path), InProcessBus()
    good = [urza.template("residual_mlp", ("B", d)) for d in (4, 6, 8)]
    for i, bp in enumerate(good):
        bus.publish(REQUESTS, CompilationRequest(request_id=f"r{i}", blueprint_id=bp.blueprint_id))
    bus.publish(REQUESTS, CompilationRequest(request_id="missing", blueprint_id="f" * 64))
    held = bus.read(REQUESTS, GROUP, count=2, consumer="dead")  # a worker that took two jobs and died
    assert [m.request_id for _, m in held] == ["r0", "r1"]
    time.sleep(0.05)
    stop = threading.Event()
    done: list[str] = []

    def answered(_: object) -> None:
        done.append("x")
        if len(done) == 4:
            stop.set()

    bus.subscribe("compilation.kernel.ready", answered)
    stats = run_compile_worker(bus, urza, consumer="alive", stop=stop, min_idle_s=0.01, poll_s=0.05,
                               benchmark_repeats=1)
    assert (stats.compiled, stats.failed, stats.claimed) == (3, 1, 2)
    outcomes = {m.request_id: m for _, m in bus.read("compilation.kernel.ready", "trainer")}
    assert sorted(outcomes) == ["missing", "r0", "r1", "r2"]
    assert outcomes["missing"].status == KernelStatus.FAILED and "not in the library" in str(outcomes["missing"].error)
    for i, bp in enumerate(good):
        art = outcomes[f"r{i}"].artifact
        assert art is not None and art.blueprint_id == bp.blueprint_id and urza.kernel(art.artifact_id)
    assert bus.pending(REQUESTS, GROUP) == 0
    # Doing a job again (a worker died after answering, before acknowledging) stores nothing new.
    before = urza.meta.list_artifacts()
    bus.publish(REQUESTS, CompilationRequest(request_id="r0", blueprint_id=good[0].blueprint_id,
                                             settings=CompileSettings()))
    stop.clear()
    done.clear()
    done.extend(["x"] * 3)
    run_compile_worker(bus, urza, consumer="alive", stop=stop, poll_s=0.05, benchmark_repeats=1)
    assert urza.meta.list_artifacts() == before


def test_workers_mode_needs_a_networked_bus(tmp_path) -> None:
    cfg = config(tmp_path)
    cfg = cfg.model_copy(update={"library": cfg.library.model_copy(update={"compile_in": "workers"})})
    with pytest.raises(ConfigError, match="compile_in='workers' needs the bus on Redis"):
        assemble(linear_host(), cfg)
