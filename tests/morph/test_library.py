"""MOR-5: Urza content addressing and verification, Kasmina's LRU byte-bounded cache, Tezzeret's background worker,
Urabrask's measurements."""

from __future__ import annotations

import threading

import pytest
import torch

from cambium.morph.bus import InProcessBus
from cambium.morph.cache import KernelCache, module_bytes
from cambium.morph.compiler import Tezzeret, load_kernel
from cambium.morph.contracts import CompileSettings, KernelStatus
from cambium.morph.kernel_bench import tags_for
from cambium.morph.library import ArtifactError, Urza


@pytest.fixture
def urza(tmp_path):
    return Urza.local(tmp_path / "urza")


def test_compile_store_load_round_trip(urza):
    bp = urza.template("conv_bottleneck", ("B", 8, 4, 4))
    tz = Tezzeret(urza, benchmark_repeats=2)
    try:
        art = tz.compile(bp.blueprint_id, CompileSettings(init_seed=1, zero_init_output=False))
    finally:
        tz.close()
    assert art.ir_hash == bp.blueprint_id and art.param_count == bp.param_count
    assert art.latency_ms is not None and art.latency_ms > 0 and art.tags == tags_for(art.latency_ms, art.param_count)
    assert art.state_bytes > art.param_count * 4  # BN running statistics are buffers
    record, payload = urza.kernel(art.artifact_id)
    assert record == art
    kernel = load_kernel(payload, record)
    fresh = Tezzeret(urza).compile(bp.blueprint_id, CompileSettings(init_seed=1, zero_init_output=False))
    assert fresh == art  # the same IR and settings reuse the stored kernel
    x = torch.randn(2, 8, 4, 4)
    kernel.eval()
    assert kernel(x).shape == x.shape
    assert urza.blueprint(bp.blueprint_id).status.value == "VALIDATED"


def test_tampered_artifact_is_rejected(urza):
    bp = urza.template("low_rank_adapter", ("B", 8))
    art = Tezzeret(urza).compile(bp.blueprint_id, CompileSettings())
    path = urza.objects.root / "objects" / art.artifact_id[:2] / art.artifact_id
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hashes to"):
        urza.kernel(art.artifact_id)
    with pytest.raises(ArtifactError, match="not a sha256"):
        urza.objects.get("../../etc/passwd")


def test_lru_cache_is_bounded_in_bytes():
    def make(size):
        return lambda _id: torch.nn.Linear(size, 1, bias=False)

    one = module_bytes(torch.nn.Linear(100, 1, bias=False))  # 400 bytes
    cache = KernelCache(max_bytes=2 * one + 10)
    a = cache.get("a", make(100))
    cache.get("b", make(100))
    assert cache.bytes == 2 * one and cache.misses == 2
    a2 = cache.get("a", make(100))  # hit, and "a" becomes most recent
    assert cache.hits == 1 and a2 is not a and torch.equal(a2.weight, a.weight)
    cache.get("c", make(100))  # evicts "b", the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and cache.evictions == 1
    assert cache.bytes <= cache.max_bytes
    cache.get("huge", make(10_000))  # bigger than the whole budget: served, not kept
    assert "huge" not in cache and cache.bytes <= cache.max_bytes


def test_training_loop_keeps_stepping_while_a_compile_is_in_flight(urza):
    bus = InProcessBus()
    started, release = threading.Event(), threading.Event()

    def hold(_request):
        started.set()
        assert release.wait(30)

    tz = Tezzeret(urza, bus, on_start=hold)
    try:
        from cambium.morph.contracts import CompilationRequest

        bp = urza.template("residual_mlp", ("B", 16))
        request = CompilationRequest(request_id="r1", blueprint_id=bp.blueprint_id)
        bus.publish("compilation.blueprint.submitted", request)
        assert started.wait(30)
        model = torch.nn.Linear(16, 16)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = 0
        while steps < 20:
            loss = model(torch.randn(4, 16)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            assert tz.in_flight == 1  # the compile is still held, and the loop was never blocked by it
        assert bus.read("compilation.kernel.ready", "t") == []
        release.set()
        assert tz.wait_idle(30)
        ((_, ready),) = bus.read("compilation.kernel.ready", "t")
        assert ready.request_id == "r1" and ready.status == KernelStatus.READY
    finally:
        release.set()
        tz.close()


def test_failed_compile_is_reported_not_raised(urza):
    bus = InProcessBus()
    tz = Tezzeret(urza, bus)
    try:
        from cambium.morph.contracts import CompilationRequest

        fut = tz.submit(CompilationRequest(request_id="r", blueprint_id="0" * 64))
        ready = fut.result(30)
        assert ready.status == KernelStatus.FAILED and "not in the library" in (ready.error or "")
        assert tz.failed == 1
    finally:
        tz.close()
