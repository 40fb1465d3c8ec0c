"""MOR-5: Urza content addressing and verification, Kasmina's LRU byte-bounded cache, Tezzeret's background worker,
Urabrask's measurements."""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load

from cambium.morph.bus import InProcessBus
from cambium.morph.cache import KernelCache, module_bytes
from cambium.morph.compiler import Tezzeret, load_kernel, serialize
from cambium.morph.contracts import CompiledKernelArtifact, CompileSettings, KernelStatus
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
    assert art.latency_ms is not None and art.latency_ms > 0
    assert art.tags == tags_for(art.latency_ms, art.param_count, art.state_bytes + art.activation_bytes, True)
    assert art.tags[2:] == ("low_memory", "risk_high")  # BN keeps running statistics
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


class _Exploit:
    """A pickle that would create `marker` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _store_raw(urza: Urza, payload: bytes, like: CompiledKernelArtifact) -> CompiledKernelArtifact:
    record = like.model_copy(update={"artifact_id": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload)})
    return urza.store_kernel(payload, record)


def test_kernel_payload_is_safetensors_and_pickles_are_refused(urza, tmp_path):
    """Issue 14: kernels travel (S3 at scale), so their payload is safetensors; a pickled one, even one that is
    harmless under `weights_only=True`, is refused in one line and never unpickled."""
    bp = urza.template("low_rank_adapter", ("B", 8))
    tz = Tezzeret(urza)
    art = tz.compile(bp.blueprint_id, CompileSettings(init_seed=3))
    _, payload = urza.kernel(art.artifact_id)
    tensors = safetensors_load(payload)  # a plain safetensors file, readable by any safetensors reader
    kernel = load_kernel(payload, art)
    assert set(tensors) == set(kernel.state_dict())
    assert all(torch.equal(tensors[k], v) for k, v in kernel.state_dict().items())
    assert serialize(bp.ir, art.settings, kernel) == payload  # deterministic: the payload's sha256 is its address

    marker = tmp_path / "pwned"
    old = io.BytesIO()  # the pre-safetensors format, which `torch.load(weights_only=True)` would accept
    torch.save({"format": "cambium.morph.kernel/1", "ir": bp.ir.model_dump_json(),
                "settings": art.settings.model_dump_json(), "state": dict(kernel.state_dict())}, old)
    for hostile in (old.getvalue(), pickle.dumps({"state": _Exploit(marker)})):
        record = _store_raw(urza, hostile, art)
        with pytest.raises(ArtifactError, match=r"not a cambium\.morph\.kernel/2 safetensors payload") as exc:
            load_kernel(urza.kernel(record.artifact_id)[1], record)
        assert "\n" not in str(exc.value)
    assert not marker.exists()
    tz.close()


def test_kernel_stored_in_the_old_format_is_compiled_again(urza, tmp_path):
    settings = CompileSettings(init_seed=4)
    elsewhere = Urza.local(tmp_path / "elsewhere")
    fresh = Tezzeret(elsewhere).compile(elsewhere.template("low_rank_adapter", ("B", 8)).blueprint_id, settings)
    bp = urza.template("low_rank_adapter", ("B", 8))
    stale = _store_raw(urza, pickle.dumps({"format": "cambium.morph.kernel/1"}), fresh)
    tz = Tezzeret(urza)
    again = tz.compile(bp.blueprint_id, settings)
    tz.close()
    assert again.artifact_id == fresh.artifact_id != stale.artifact_id  # compiled again, the stale record not reused
    assert isinstance(load_kernel(urza.kernel(again.artifact_id)[1], again), torch.nn.Module)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1))
def test_hostile_payload_bytes_give_one_line(body: bytes, prefix: int) -> None:
    record = CompiledKernelArtifact.model_construct(artifact_id="0" * 64, ir_hash="0" * 64)
    for payload in (body, prefix.to_bytes(8, "little") + body):
        with pytest.raises(ArtifactError) as exc:
            load_kernel(payload, record)
        assert "\n" not in str(exc.value)
