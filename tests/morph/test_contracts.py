"""MOR-1: every contract round-trips losslessly through JSON and rejects unknown fields and wrong types."""

from __future__ import annotations

import json

import pytest

from cambium.core.errors import ProtocolError
from cambium.morph.contracts import (
    AdaptationKind,
    AdaptationSignal,
    Blueprint,
    BlueprintIR,
    BusMessage,
    CommandKind,
    CompilationRequest,
    CompiledKernelArtifact,
    CompileSettings,
    EpochEvent,
    FieldReport,
    HealthSignal,
    IRNode,
    KasminaCommand,
    KernelReady,
    KernelStatus,
    OpKind,
    Seed,
    SeedState,
    StateChange,
    SystemStatePacket,
    parse,
)

IR = BlueprintIR(
    input_shape=("B", 8),
    nodes=(
        IRNode(id="h", op=OpKind.LINEAR, inputs=("x",), attrs={"in_features": 8, "out_features": 4}, shape=("B", 4)),
        IRNode(id="a", op=OpKind.RELU, inputs=("h",), shape=("B", 4)),
        IRNode(id="o", op=OpKind.LINEAR, inputs=("a",), attrs={"in_features": 4, "out_features": 8}, shape=("B", 8)),
    ),
    output="o",
)
H = "a" * 64
HEALTH = HealthSignal(
    seed_id="s0", index=0, epoch=3, state=SeedState.DORMANT, activation_mean=0.1, activation_variance=2.0,
    gradient_norm=0.5, dead_unit_ratio=0.25, health_score=0.2, confidence=0.8, samples=10,
)
SEED = Seed(seed_id="s0", index=0, location="features.2", state=SeedState.GRAFTING, blueprint_id=H, alpha=0.5)
ARTIFACT = CompiledKernelArtifact(
    artifact_id=H, blueprint_id=IR.ir_hash(), ir_hash=IR.ir_hash(), device="cpu", settings=CompileSettings(),
    payload_bytes=10, param_count=68, state_bytes=272, activation_bytes=64, latency_ms=0.05, benchmark_batch=8,
    tags=("fast", "small"), created_at=1.5,
)
CHANGE = StateChange(epoch=1, source=SeedState.DORMANT, target=SeedState.GERMINATED, reason="health 0.2")
EXAMPLES = [
    IR,
    Blueprint(blueprint_id=IR.ir_hash(), name="residual_mlp", family="residual_mlp", ir=IR, param_count=68),
    ARTIFACT,
    SEED,
    HEALTH,
    SystemStatePacket(epoch=3, step=100, train_loss=1.5, val_metric=0.4, health=(HEALTH,), seeds=(SEED,)),
    AdaptationSignal(kind=AdaptationKind.GERMINATE, seed_id="s0", blueprint_name="se", confidence=0.9, epoch=3),
    FieldReport(
        seed_id="s0", blueprint_id=H, artifact_id=None, outcome=SeedState.CULLED, health_at_decision=0.2,
        metric_before=0.4, metric_after=0.3, epoch_started=1, epoch_finished=5, timeline=(CHANGE,),
    ),
    KasminaCommand(command_id="c1", kind=CommandKind.GERMINATE, seed_id="s0", blueprint_id=H, epoch=2),
    CompilationRequest(request_id="r1", blueprint_id=H),
    KernelReady(request_id="r1", blueprint_id=H, status=KernelStatus.READY, artifact=ARTIFACT),
    KernelReady(request_id="r2", blueprint_id=H, status=KernelStatus.FAILED, error="boom"),
    EpochEvent(epoch=1, step=10, train_loss=2.0, seeds=(SEED,)),
    BusMessage(topic="t", message_id="m", sequence=0, payload={"a": [1, 2.5, "x"], "b": None}),
]


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_json_round_trip_is_lossless(obj):
    text = obj.model_dump_json()
    back = parse(type(obj), text)
    assert back == obj
    assert back.model_dump_json() == text
    assert parse(type(obj), json.loads(text)) == obj


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: type(o).__name__)
def test_unknown_field_rejected(obj):
    data = json.loads(obj.model_dump_json())
    data["surprise"] = 1
    with pytest.raises(ProtocolError, match=r"surprise: unknown field"):
        parse(type(obj), data)


def test_wrong_types_rejected_with_field_and_value():
    data = json.loads(HEALTH.model_dump_json())
    data["samples"] = "10"
    with pytest.raises(ProtocolError, match=r"HealthSignal: samples=\"10\""):
        parse(HealthSignal, data)
    data = json.loads(HEALTH.model_dump_json())
    data["health_score"] = 1.5
    with pytest.raises(ProtocolError, match=r"health_score=1.5"):
        parse(HealthSignal, data)
    data = json.loads(SEED.model_dump_json())
    data["state"] = "ASLEEP"
    with pytest.raises(ProtocolError, match=r"state=\"ASLEEP\""):
        parse(Seed, data)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse(Seed, "{nope")


def test_blueprint_graph_rules():
    data = json.loads(IR.model_dump_json())
    data["nodes"][0]["inputs"] = ["o"]
    with pytest.raises(ProtocolError, match="topological"):
        parse(BlueprintIR, data)
    data = json.loads(IR.model_dump_json())
    data["output"] = "x"
    with pytest.raises(ProtocolError, match="output"):
        parse(BlueprintIR, data)
    wrong = json.loads(EXAMPLES[1].model_dump_json())
    wrong["blueprint_id"] = "b" * 64
    with pytest.raises(ProtocolError, match="not the sha256 of its IR"):
        parse(Blueprint, wrong)


def test_ir_hash_ignores_key_order():
    data = json.loads(IR.model_dump_json())
    data["nodes"][0]["attrs"] = {"out_features": 4, "in_features": 8}
    assert parse(BlueprintIR, data).ir_hash() == IR.ir_hash()


def test_kernel_ready_requires_artifact_iff_ready():
    with pytest.raises(ProtocolError, match="requires artifact iff READY"):
        parse(KernelReady, {"request_id": "r", "blueprint_id": H, "status": "READY"})


def test_field_report_outcome_must_be_terminal_outcome():
    data = json.loads(EXAMPLES[7].model_dump_json())
    data["outcome"] = "GRAFTING"
    with pytest.raises(ProtocolError, match="outcome"):
        parse(FieldReport, data)
