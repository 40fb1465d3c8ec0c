"""Tezzeret, the compiler: BlueprintIR → runnable module, in a background worker that never blocks training.

Compiling = building the module with deterministic parameters (a private generator seeded by
`settings.init_seed`), generating its forward as straight-line Python from the IR (backend "codegen"; "eager" keeps
the interpreting IRModule), benchmarking it (Urabrask), and storing the payload content-addressed in Urza. torch.fx
is deliberately not used: its tracer patches `nn.Module.__call__` process-wide, which would hijack the training
loop's forwards running in the main thread while the worker traces. The module is rebuilt from the IR on load.

The payload is safetensors, never a pickle: kernels travel between processes and machines (an S3 store at scale), and
a pickle, even under `torch.load(weights_only=True)`, has had code-execution bypasses (CVE-2025-32434,
CVE-2026-24747). The state dict is the tensors; the IR and settings JSON sit in the header's metadata under one key
(safetensors writes several metadata keys in random order, and the payload's sha256 is its address).

The worker is one thread fed by a queue: `submit` returns a Future at once; with a bus, requests arrive on
compilation.blueprint.submitted and outcomes leave on compilation.kernel.ready.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from cambium.morph.bus import Bus
from cambium.morph.contracts import (
    BlueprintIR,
    BlueprintStatus,
    CompilationRequest,
    CompiledKernelArtifact,
    CompileSettings,
    KernelReady,
    KernelStatus,
    parse,
)
from cambium.morph.ir import BlueprintError, CompiledIRModule, build_module
from cambium.morph.kernel_bench import benchmark
from cambium.morph.library import ArtifactError, Urza

__all__ = ["PAYLOAD_FORMAT", "Tezzeret", "compile_module", "load_kernel", "payload_header", "serialize"]

PAYLOAD_FORMAT = "cambium.morph.kernel/2"
_META_KEY = "cambium.morph.kernel"
_MAX_HEADER = 16 << 20  # bytes; an IR header is a few KB, the length prefix of a hostile payload can be anything
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def compile_module(ir: BlueprintIR, settings: CompileSettings) -> nn.Module:
    kwargs: dict[str, Any] = {
        "seed": settings.init_seed, "dtype": _DTYPES[settings.dtype], "zero_init_output": settings.zero_init_output
    }
    if settings.backend == "codegen":
        return CompiledIRModule(ir, **kwargs)
    return build_module(ir, seed=settings.init_seed, dtype=_DTYPES[settings.dtype],
                        zero_init_output=settings.zero_init_output)


def serialize(ir: BlueprintIR, settings: CompileSettings, module: nn.Module) -> bytes:
    """The kernel's payload: its state dict as safetensors, with the IR and settings in the header metadata."""
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    meta = json.dumps({"format": PAYLOAD_FORMAT, "ir": ir.model_dump_json(), "settings": settings.model_dump_json()},
                      sort_keys=True)
    return safetensors_save(state, metadata={_META_KEY: meta})


def payload_header(payload: bytes) -> dict[str, str] | None:
    """The format, IR and settings JSON of a kernel payload, or None when it is not a kernel safetensors payload
    (a pickle, an older format, damaged bytes). Reads the header only."""
    if len(payload) < 8:
        return None
    n = int.from_bytes(payload[:8], "little")
    if n > min(_MAX_HEADER, len(payload) - 8):
        return None
    try:
        header = json.loads(payload[8:8 + n])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != PAYLOAD_FORMAT:
        return None
    if not all(isinstance(meta.get(k), str) for k in ("ir", "settings")):
        return None
    return meta


def load_kernel(payload: bytes, record: CompiledKernelArtifact) -> nn.Module:
    """Rebuild the kernel from verified payload bytes; raise ArtifactError (one line) if they are not a
    `PAYLOAD_FORMAT` safetensors payload or do not match `record`. Nothing is unpickled."""
    name = f"kernel {record.artifact_id[:12]}..."
    meta = payload_header(payload)
    if meta is None:
        raise ArtifactError(f"{name} is not a {PAYLOAD_FORMAT} safetensors payload (pickled or older kernels are "
                            "refused): recompile it")
    try:
        state = safetensors_load(payload)
        ir = parse(BlueprintIR, meta["ir"])
        settings = parse(CompileSettings, meta["settings"])
    except (SafetensorError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{name} is not a readable payload: {first}") from None
    if ir.ir_hash() != record.ir_hash:
        raise ArtifactError(f"{name} holds IR {ir.ir_hash()[:12]}..., record says {record.ir_hash[:12]}...")
    module = compile_module(ir, settings)
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{name} does not fit its IR: {str(exc).splitlines()[0]}") from None
    return module


class Tezzeret:
    """The background compiler."""

    def __init__(
        self, urza: Urza, bus: Bus | None = None, *, device: str = "cpu", benchmark_batch: int = 8,
        benchmark_repeats: int = 5, on_start: Callable[[CompilationRequest], None] | None = None,
    ) -> None:
        self.urza = urza
        self.bus = bus
        self.device = device
        self.benchmark_batch = benchmark_batch
        self.benchmark_repeats = benchmark_repeats
        self.on_start = on_start
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tezzeret")
        self._idle = threading.Condition()
        self._in_flight = 0
        self.compiled = 0
        self.failed = 0
        if bus is not None:
            bus.subscribe("compilation.blueprint.submitted", self._on_request)

    @property
    def in_flight(self) -> int:
        with self._idle:
            return self._in_flight

    def _on_request(self, request: CompilationRequest) -> None:
        self.submit(request)

    def submit(self, request: CompilationRequest) -> Future[KernelReady]:
        """Queue a compilation; returns immediately."""
        with self._idle:
            self._in_flight += 1
        return self._pool.submit(self._run, request)

    def _run(self, request: CompilationRequest) -> KernelReady:
        try:
            if self.on_start is not None:
                self.on_start(request)
            ready = self.outcome(request)
            if self.bus is not None:
                self.bus.publish("compilation.kernel.ready", ready)
            return ready
        finally:
            # Only after publishing, so wait_idle() returning means every outcome is on the bus.
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no compilation is queued or running (used at epoch boundaries only). False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def outcome(self, request: CompilationRequest) -> KernelReady:
        """Compile synchronously and say how it went; a failure is reported, never raised (the trainer decides)."""
        try:
            artifact = self.compile(request.blueprint_id, request.settings)
        except Exception as exc:  # any failure of a blueprint must reach the trainer as FAILED, not kill the worker
            self.failed += 1
            return KernelReady(request_id=request.request_id, blueprint_id=request.blueprint_id,
                               status=KernelStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        self.compiled += 1
        return KernelReady(request_id=request.request_id, blueprint_id=request.blueprint_id,
                           status=KernelStatus.READY, artifact=artifact)

    def compile(self, blueprint_id: str, settings: CompileSettings) -> CompiledKernelArtifact:
        """Compile synchronously (the worker's body); reuses a stored kernel with the same IR and settings."""
        bp = self.urza.blueprint(blueprint_id)
        for art in self.urza.meta.list_artifacts(bp.blueprint_id):
            if (art.ir_hash == bp.blueprint_id and art.settings == settings and art.device == self.device
                    and not self._outdated(art)):
                return art
        try:
            module = compile_module(bp.ir, settings)
        except BlueprintError:
            self.urza.set_status(blueprint_id, BlueprintStatus.REJECTED)
            raise
        bench = benchmark(module, bp.ir, self.benchmark_batch, self.benchmark_repeats)
        payload = serialize(bp.ir, settings, module)
        record = CompiledKernelArtifact(
            artifact_id=hashlib.sha256(payload).hexdigest(), blueprint_id=bp.blueprint_id, ir_hash=bp.blueprint_id,
            device=self.device, settings=settings, payload_bytes=len(payload), param_count=bench.param_count,
            state_bytes=bench.state_bytes, activation_bytes=bench.activation_bytes, latency_ms=bench.latency_ms,
            benchmark_batch=self.benchmark_batch, tags=bench.tags, status=KernelStatus.READY, created_at=time.time(),
        )
        self.urza.store_kernel(payload, record)
        if bp.status == BlueprintStatus.PROPOSED:
            self.urza.set_status(blueprint_id, BlueprintStatus.VALIDATED)
        return record

    def _outdated(self, art: CompiledKernelArtifact) -> bool:
        """A stored kernel of an older (pickled) format is compiled again rather than reused: it would fail every load.
        A missing or tampered one is reused, so that loading it reports why."""
        try:
            payload = self.urza.objects.get(art.artifact_id)
        except ArtifactError:
            return False
        return payload_header(payload) is None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
