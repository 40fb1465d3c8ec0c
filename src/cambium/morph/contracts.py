"""Wire contracts of morph: every message and record the services exchange, as frozen strict pydantic models.

One module holds them all so the vocabulary of the origin (Kasmina, Tamiyo, Tezzeret, Urza, Oona, ...) is readable in
one place. Every model is frozen, strict (no coercion: a string is never a number) and rejects unknown fields; a
JSON round trip (`model_dump_json` → `parse`) gives back an equal object. `parse` turns a validation failure into a
`ProtocolError` naming the model, the dotted field and the offending value.

Shapes inside a `BlueprintIR` are tuples of ints and symbols; the only symbols are "B" (batch) and "T" (sequence
length), which are bound when a kernel runs, so one IR serves any batch size.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cambium.core.errors import ProtocolError

__all__ = [
    "SYMBOLS",
    "AdaptationKind",
    "AdaptationSignal",
    "Blueprint",
    "BlueprintIR",
    "BlueprintStatus",
    "BusMessage",
    "CommandKind",
    "CompilationRequest",
    "CompileSettings",
    "CompiledKernelArtifact",
    "Contract",
    "EpochEvent",
    "FieldReport",
    "HealthSignal",
    "IRNode",
    "KasminaCommand",
    "KernelReady",
    "KernelStatus",
    "OpKind",
    "Seed",
    "SeedState",
    "StateChange",
    "SystemStatePacket",
    "parse",
]

SYMBOLS = ("B", "T")
_ID = re.compile(r"^[a-z_][a-z0-9_]*$")
_SHA256 = r"^[0-9a-f]{64}$"

C = TypeVar("C", bound=BaseModel)

Dim = int | Literal["B", "T"]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]


class Contract(BaseModel):
    """Base of every contract: frozen, strict, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=True)


def parse(model: type[C], data: str | bytes | dict[str, Any]) -> C:
    """Validate JSON text or a decoded mapping against `model`; raise ProtocolError naming every bad field."""
    try:
        if isinstance(data, dict):
            # Decoded JSON is validated in JSON mode so enums and tuples read as they do from text.
            return model.model_validate_json(json.dumps(data))
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                problems.append(f"{dotted}: unknown field (known: {', '.join(sorted(model.model_fields))})")
            elif err["type"] == "json_invalid":
                problems.append(f"not valid JSON: {err['msg']}")
            elif err["type"] == "missing":
                problems.append(f"{dotted}: required field is missing")
            else:
                value = json.dumps(err.get("input"), default=str)[:80]
                problems.append(f"{dotted}={value}: {err['msg']}")
        raise ProtocolError(f"invalid {model.__name__}: " + "; ".join(problems)) from None


class SeedState(enum.StrEnum):
    """The 11 lifecycle states of a seed (semantics in cambium.morph.lifecycle)."""

    DORMANT = "DORMANT"
    GERMINATED = "GERMINATED"
    LOADING = "LOADING"
    TRAINING = "TRAINING"
    GRAFTING = "GRAFTING"
    STABILIZATION = "STABILIZATION"
    EVALUATING = "EVALUATING"
    FINE_TUNING = "FINE_TUNING"
    FOSSILIZED = "FOSSILIZED"
    CULLED = "CULLED"
    ROLLED_BACK = "ROLLED_BACK"


class BlueprintStatus(enum.StrEnum):
    """Where a blueprint stands in the Urza library."""

    PROPOSED = "PROPOSED"  # written by Karn, not yet compiled
    VALIDATED = "VALIDATED"  # shapes checked, compiled at least once
    REJECTED = "REJECTED"  # failed validation or compilation
    RETIRED = "RETIRED"  # kept for history, never proposed again


class KernelStatus(enum.StrEnum):
    """Status of one compiled kernel artifact."""

    PENDING = "PENDING"
    COMPILING = "COMPILING"
    READY = "READY"
    FAILED = "FAILED"
    REJECTED = "REJECTED"  # failed hash verification or benchmarking


class OpKind(enum.StrEnum):
    """Operations a BlueprintIR node may use (shape rules and modules in cambium.morph.ir)."""

    LINEAR = "linear"
    CONV2D = "conv2d"
    BATCHNORM2D = "batchnorm2d"
    LAYERNORM = "layernorm"
    RELU = "relu"
    GELU = "gelu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    SCALE = "scale"
    GLOBAL_AVG_POOL = "global_avg_pool"
    TO_TOKENS = "to_tokens"
    FROM_TOKENS = "from_tokens"
    SELF_ATTENTION = "self_attention"


class CommandKind(enum.StrEnum):
    """Commands Kasmina accepts on control.kasmina.commands."""

    GERMINATE = "GERMINATE"
    LOAD_KERNEL = "LOAD_KERNEL"
    TRANSITION = "TRANSITION"
    CULL = "CULL"
    ROLLBACK = "ROLLBACK"


class AdaptationKind(enum.StrEnum):
    """What Tamiyo asks for."""

    GERMINATE = "GERMINATE"
    WAIT = "WAIT"


class IRNode(Contract):
    """One node of a blueprint graph: `op` applied to earlier nodes (or the input "x"), output of `shape`."""

    id: str = Field(description="node name, [a-z_][a-z0-9_]*, unique in the graph; 'x' is the input")
    op: OpKind = Field(description="operation")
    inputs: tuple[str, ...] = Field(description="ids of the nodes (or 'x') this node reads, in order")
    attrs: dict[str, int | float | bool | str] = Field(default_factory=dict, description="op attributes")
    shape: tuple[Dim, ...] = Field(description="declared output shape; checked by shape inference")

    @model_validator(mode="after")
    def _check_id(self) -> IRNode:
        if not _ID.match(self.id) or self.id == "x":
            raise ValueError(f"node id {self.id!r} must match [a-z_][a-z0-9_]* and not be 'x'")
        return self


class BlueprintIR(Contract):
    """A blueprint as a JSON graph: it maps an input of `input_shape` to a residual of the same shape."""

    version: Literal[1] = Field(default=1, description="IR format version")
    input_shape: tuple[Dim, ...] = Field(description="shape of the activation at the seed location, e.g. [B, C, H, W]")
    nodes: tuple[IRNode, ...] = Field(min_length=1, description="nodes in topological order")
    output: str = Field(description="id of the node whose value is the residual f(x)")

    @model_validator(mode="after")
    def _check_graph(self) -> BlueprintIR:
        seen = {"x"}
        for node in self.nodes:
            if node.id in seen:
                raise ValueError(f"node id {node.id!r} is defined twice")
            for name in node.inputs:
                if name not in seen:
                    raise ValueError(
                        f"node {node.id!r} reads {name!r}, which is not 'x' or an earlier node (nodes must be in "
                        "topological order)"
                    )
            seen.add(node.id)
        if self.output not in seen - {"x"}:
            raise ValueError(f"output {self.output!r} is not a node of the graph")
        return self

    def ir_hash(self) -> str:
        """sha256 of the canonical JSON of the graph: equal graphs hash equal whatever the attribute order."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class Blueprint(Contract):
    """A named, library-held blueprint: the IR plus what Urza knows about it."""

    blueprint_id: str = Field(pattern=_SHA256, description="sha256 of the IR (BlueprintIR.ir_hash)")
    name: str = Field(min_length=1, description="human name, e.g. 'residual_mlp'")
    family: str = Field(min_length=1, description="template family it came from (Karn mutants keep the family)")
    ir: BlueprintIR = Field(description="the graph")
    status: BlueprintStatus = Field(default=BlueprintStatus.PROPOSED, description="library status")
    parent_id: str | None = Field(default=None, description="blueprint Karn mutated to get this one")
    param_count: int = Field(ge=0, description="trainable parameters of the compiled module")

    @model_validator(mode="after")
    def _check_id(self) -> Blueprint:
        if self.blueprint_id != self.ir.ir_hash():
            raise ValueError(f"blueprint_id {self.blueprint_id[:12]}... is not the sha256 of its IR")
        return self


class CompileSettings(Contract):
    """How Tezzeret turned an IR into a module; part of the artifact's identity."""

    backend: Literal["eager", "codegen"] = Field(
        default="codegen", description="'codegen' generates a straight-line forward; 'eager' interprets the graph"
    )
    dtype: Literal["float32", "float64"] = Field(default="float32", description="parameter dtype")
    init_seed: int = Field(default=0, ge=0, description="seed of the parameter initialisation")
    zero_init_output: bool = Field(
        default=True, description="zero the last parametrised op so the residual starts at exactly 0"
    )


class CompiledKernelArtifact(Contract):
    """A compiled blueprint stored content-addressed in Urza."""

    artifact_id: str = Field(pattern=_SHA256, description="sha256 of the stored payload bytes")
    blueprint_id: str = Field(pattern=_SHA256, description="blueprint it was compiled from")
    ir_hash: str = Field(pattern=_SHA256, description="sha256 of the IR (equals blueprint_id)")
    device: str = Field(description="torch device it was compiled and measured on")
    settings: CompileSettings = Field(description="compile settings")
    payload_bytes: int = Field(ge=0, description="size of the stored payload")
    param_count: int = Field(ge=0, description="trainable parameters")
    state_bytes: int = Field(ge=0, description="bytes of parameters and buffers in memory")
    activation_bytes: int = Field(ge=0, description="bytes of intermediate values for the benchmark batch")
    latency_ms: float | None = Field(default=None, ge=0.0, description="median forward latency (Urabrask)")
    benchmark_batch: int = Field(default=0, ge=0, description="batch size of the latency measurement")
    tags: tuple[str, ...] = Field(default=(), description="Urabrask tags, e.g. 'fast', 'small'")
    status: KernelStatus = Field(default=KernelStatus.READY, description="kernel status")
    created_at: float = Field(ge=0.0, description="unix time of compilation")


class Seed(Contract):
    """The public view of one seed slot."""

    seed_id: str = Field(description="'<location>' of the slot")
    index: int = Field(ge=0, description="row of this seed in the telemetry arrays")
    location: str = Field(description="dotted name of the host module the slot follows")
    state: SeedState = Field(description="lifecycle state")
    blueprint_id: str | None = Field(default=None, description="blueprint being grafted, if any")
    artifact_id: str | None = Field(default=None, description="kernel loaded, if any")
    alpha: Unit = Field(default=0.0, description="blend weight of the seed's residual")
    state_epoch: int = Field(default=0, ge=0, description="epoch at which the current state began")
    embargo_until: int = Field(default=0, ge=0, description="first epoch the location may adapt again")
    failures: int = Field(default=0, ge=0, description="adaptations at this location that were culled or rolled back")
    shape: tuple[Dim, ...] = Field(default=(), description="activation shape seen at the location, e.g. [B, C, H, W]")


class HealthSignal(Contract):
    """Telemetry of one seed over one epoch (published on telemetry.seed.health)."""

    seed_id: str
    index: int = Field(ge=0)
    epoch: int = Field(ge=0)
    state: SeedState
    activation_mean: float
    activation_variance: float = Field(ge=0.0)
    gradient_norm: float = Field(ge=0.0, description="root mean square over sampled steps of ||dL/dx||")
    dead_unit_ratio: Unit = Field(description="fraction of channels that were ~0 on every sampled batch")
    health_score: Unit = Field(description="1 = healthy, 0 = bottleneck (formula in cambium.morph.telemetry)")
    confidence: Unit = Field(description="n / (n + n_half) for n sampled batches")
    samples: int = Field(ge=0, description="batches sampled this epoch")


class SystemStatePacket(Contract):
    """What Tamiyo sees at an epoch boundary."""

    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    train_loss: float
    val_loss: float | None = None
    val_metric: float | None = None
    health: tuple[HealthSignal, ...] = ()
    seeds: tuple[Seed, ...] = ()
    adaptations_this_epoch: int = Field(default=0, ge=0)


class AdaptationSignal(Contract):
    """One decision of Tamiyo."""

    kind: AdaptationKind
    seed_id: str | None = None
    blueprint_name: str | None = None
    blueprint_id: str | None = Field(
        default=None, pattern=_SHA256,
        description="the library blueprint chosen (a Karn mutant has no template name to look up); None: the "
        "template `blueprint_name` for the seed's shape",
    )
    confidence: Unit = 0.0
    reason: str = ""
    epoch: int = Field(ge=0)


class StateChange(Contract):
    """One edge taken in a seed's lifecycle."""

    epoch: int = Field(ge=0)
    source: SeedState
    target: SeedState
    reason: str = ""


class FieldReport(Contract):
    """The outcome of one adaptation, for Simic's replay buffer and the run report."""

    seed_id: str
    blueprint_id: str | None
    artifact_id: str | None
    outcome: Literal[SeedState.FOSSILIZED, SeedState.CULLED, SeedState.ROLLED_BACK]
    health_at_decision: Unit
    metric_before: float | None
    metric_after: float | None
    epoch_started: int = Field(ge=0)
    epoch_finished: int = Field(ge=0)
    timeline: tuple[StateChange, ...]


class KasminaCommand(Contract):
    """A command on control.kasmina.commands."""

    command_id: str = Field(min_length=1)
    kind: CommandKind
    seed_id: str
    blueprint_id: str | None = None
    artifact_id: str | None = None
    target: SeedState | None = None
    health: Unit = Field(default=0.0, description="health score that motivated the command")
    epoch: int = Field(ge=0)


class CompilationRequest(Contract):
    """A blueprint submitted for compilation (compilation.blueprint.submitted)."""

    request_id: str = Field(min_length=1)
    blueprint_id: str = Field(pattern=_SHA256)
    settings: CompileSettings = CompileSettings()


class KernelReady(Contract):
    """Outcome of a compilation (compilation.kernel.ready): an artifact, or the error that stopped it."""

    request_id: str = Field(min_length=1)
    blueprint_id: str = Field(pattern=_SHA256)
    status: KernelStatus
    artifact: CompiledKernelArtifact | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _check(self) -> KernelReady:
        if (self.status == KernelStatus.READY) != (self.artifact is not None):
            raise ValueError(f"status={self.status.value} requires artifact iff READY")
        return self


class EpochEvent(Contract):
    """system.events.epoch: an epoch ended."""

    epoch: int = Field(ge=0)
    step: int = Field(ge=0)
    train_loss: float
    val_metric: float | None = None
    seeds: tuple[Seed, ...] = ()


class BusMessage(Contract):
    """The envelope Oona carries; `payload` is the JSON of the topic's contract."""

    topic: str
    message_id: str = Field(min_length=1)
    sequence: int = Field(ge=0)
    payload: dict[str, Any]
