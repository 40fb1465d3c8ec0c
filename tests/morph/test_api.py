"""MOR-9: the HTTP API — every route fuzzed by schemathesis from the published OpenAPI schema (no 5xx, responses as
documented, every call without the right bearer token 401), and the services' behaviour end to end, Kasmina's
commands executed by a real Kasmina at its next epoch boundary."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from tests.morph._harness import Harness
from tests.morph.test_storage import report

from cambium.morph.api import MAX_BODY_BYTES, create_app
from cambium.morph.bus import InProcessBus
from cambium.morph.compiler import Tezzeret
from cambium.morph.contracts import (
    CompileSettings,
    EpochEvent,
    HealthSignal,
    KernelStatus,
    Seed,
    SeedState,
    SystemStatePacket,
)
from cambium.morph.library import Urza

TOKEN = "fuzz-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _seed(state: SeedState = SeedState.DORMANT) -> Seed:
    return Seed(seed_id="layer1", index=0, location="layer1", state=state, shape=("B", 8))


def _health(score: float = 0.1) -> HealthSignal:
    return HealthSignal(seed_id="layer1", index=0, epoch=2, state=SeedState.DORMANT, activation_mean=0.0,
                        activation_variance=1e-6, gradient_norm=0.01, dead_unit_ratio=0.5, health_score=score,
                        confidence=0.9, samples=8)


_FUZZ_DIR = tempfile.TemporaryDirectory(prefix="cambium-api-fuzz-")  # removed when the test process exits


def _fuzz_app():
    """An app with something in it: a blueprint, a compiled kernel, a seed that reported telemetry."""
    urza, bus = Urza.local(Path(_FUZZ_DIR.name)), InProcessBus()
    bp = urza.template("low_rank_adapter", ("B", 8))
    tz = Tezzeret(urza, benchmark_repeats=1)
    tz.compile(bp.blueprint_id, CompileSettings())
    tz.close()
    bus.publish("system.events.epoch", EpochEvent(epoch=2, step=20, train_loss=1.0, seeds=(_seed(),)))
    bus.publish("telemetry.seed.health", _health())
    return create_app(urza, bus, token=TOKEN)


schema = schemathesis.openapi.from_asgi("/openapi.json", _fuzz_app())
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_every_route(case: schemathesis.Case) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        response = case.call(headers=headers)
        assert response.status_code == 401, (case.method, case.path, headers, response.text)
        assert response.headers["www-authenticate"] == ["Bearer"]
    case.call_and_validate(headers=AUTH, checks=CHECKS)


@pytest.fixture
def client(tmp_path):
    urza, bus = Urza.local(tmp_path / "urza"), InProcessBus()
    with TestClient(create_app(urza, bus, token=TOKEN), headers=AUTH) as c:
        c.urza = urza  # type: ignore[attr-defined]
        yield c


def test_every_documented_route_is_served_and_guarded(client) -> None:
    spec = client.get("/openapi.json", headers={}).json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    expected = {
        ("POST", "/blueprints"), ("GET", "/blueprints/{blueprint_id}"), ("GET", "/kernels/{artifact_id}"),
        ("POST", "/kernels/{artifact_id}/status"), ("POST", "/step"), ("GET", "/policy/status"),
        ("POST", "/policy/load"), ("POST", "/analyze"), ("GET", "/policy/version"), ("POST", "/policy/update"),
        ("GET", "/decisions/history"), ("POST", "/training/experience"), ("POST", "/seeds/{seed_id}/germinate"),
        ("GET", "/seeds/{seed_id}/status"), ("POST", "/seeds/{seed_id}/transition"),
        ("POST", "/layers/{seed_id}/load_kernel"), ("GET", "/layers/{seed_id}/stats"),
        ("POST", "/layers/{seed_id}/unload_kernel"),
    }
    assert routes == expected
    assert spec["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path in ("/nope", "/blueprints"):
        assert client.request("TRACE", path, headers={"Authorization": ""}).status_code == 401


def test_urza_routes(client) -> None:
    bp = client.urza.template("residual_mlp", ("B", 4))
    mutant = bp.ir.model_dump(mode="json")
    sub = {"name": "mlp-copy", "family": "residual_mlp", "ir": mutant}
    r = client.post("/blueprints", json=sub)
    assert r.status_code == 201 and r.json()["blueprint_id"] == bp.blueprint_id  # same graph, same record
    assert client.get(f"/blueprints/{bp.blueprint_id}").json() == bp.model_dump(mode="json")
    bad = {**sub, "ir": {**mutant, "nodes": [{**mutant["nodes"][0], "shape": ["B", 5]}, *mutant["nodes"][1:]]}}
    r = client.post("/blueprints", json=bad)
    assert r.status_code == 422 and "\n" not in r.json()["detail"]
    assert client.post("/blueprints", json={**sub, "parent_id": "a" * 64}).status_code == 404
    assert client.post("/blueprints", json={**sub, "extra": 1}).json()["detail"].startswith(
        "invalid BlueprintSubmission: extra: unknown field")
    assert client.get(f"/blueprints/{'a' * 64}").status_code == 404
    huge = client.post("/blueprints", content=b" " * (MAX_BODY_BYTES + 1))
    assert huge.status_code == 413 and huge.json()["detail"] == f"body exceeds {MAX_BODY_BYTES} bytes"
    tz = Tezzeret(client.urza, benchmark_repeats=1)
    art = tz.compile(bp.blueprint_id, CompileSettings())
    tz.close()
    assert client.get(f"/kernels/{art.artifact_id}").json() == art.model_dump(mode="json")
    r = client.post(f"/kernels/{art.artifact_id}/status", json={"status": "REJECTED"})
    assert r.json()["status"] == "REJECTED" and client.urza.kernel(art.artifact_id)[0].status == KernelStatus.REJECTED
    assert client.post(f"/kernels/{'b' * 64}/status", json={"status": "READY"}).status_code == 404
    assert client.post(f"/kernels/{art.artifact_id}/status", json={"status": "GONE"}).status_code == 422


def test_tamiyo_routes(client) -> None:
    packet = SystemStatePacket(epoch=3, step=30, train_loss=1.0, health=(_health(0.1),), seeds=(_seed(),))
    r = client.post("/step", content=packet.model_dump_json())
    (signal,) = r.json()["signals"]
    assert signal["seed_id"] == "layer1" and signal["blueprint_name"] == "residual_mlp" and signal["epoch"] == 3
    analysis = client.post("/analyze", content=packet.model_dump_json()).json()
    assert analysis["seeds"] == {"layer1": "candidate"} and analysis["signals"] == r.json()["signals"]
    healthy = packet.model_copy(update={"health": (_health(0.9),)})
    why = client.post("/analyze", content=healthy.model_dump_json()).json()["seeds"]
    assert why == {"layer1": "health 0.900 >= 0.3"}
    assert [d["epoch"] for d in client.get("/decisions/history").json()] == [3]  # analyze records nothing
    assert client.get("/policy/status").json()["decisions"] == 1
    v1 = client.get("/policy/version").json()
    r = client.post("/policy/load", json={"kind": "gnn"})
    assert r.status_code == 422 and "needs path" in r.json()["detail"]  # loading one: tests/morph/test_gnn.py
    v2 = client.post("/policy/load", json={"kind": "heuristic", "config": {"health_threshold": 0.05}}).json()
    assert v2["version"] == v1["version"] + 1 and v2["config_sha256"] != v1["config_sha256"]
    assert client.post("/step", content=packet.model_dump_json()).json()["signals"] == []  # 0.1 >= 0.05 now
    v3 = client.post("/policy/update", json={"health_threshold": 0.5, "max_adaptations_per_epoch": 0}).json()
    assert v3["version"] == 3
    status = client.get("/policy/status").json()
    assert status["config"]["health_threshold"] == 0.5 and status["max_adaptations_per_epoch"] == 0
    assert client.post("/step", content=packet.model_dump_json()).json()["signals"] == []  # no budget
    assert client.post("/policy/update", json={"health_threshold": 2}).status_code == 422
    assert [d["policy_version"] for d in client.get("/decisions/history", params={"limit": 2}).json()] == [2, 3]
    for i in range(3):
        r = client.post("/training/experience", content=report(f"s{i}").model_dump_json())
        assert r.status_code == 201 and r.json() == {"buffer_size": i + 1}
    assert [rep.seed_id for rep in client.urza.experience()] == ["s0", "s1", "s2"]
    assert client.get("/policy/status").json()["replay_buffer"] == 3


def test_kasmina_routes_drive_a_real_kasmina_at_its_boundaries(tmp_path) -> None:
    h = Harness(tmp_path)
    try:
        app = create_app(h.m.urza, h.m.bus, token=TOKEN)
        with TestClient(app, headers=AUTH) as c:
            assert c.get("/seeds/1/status").status_code == 404  # nothing reported before the first boundary
            h.run_epoch()
            seed = c.get("/seeds/1/status").json()
            assert seed["state"] == "DORMANT" and seed["shape"] == ["B", 8]
            assert c.get("/layers/1/stats").json()["seed_id"] == "1"
            assert c.get("/seeds/nope/status").status_code == 404
            bp = h.m.urza.template("low_rank_adapter", ("B", 8))
            wrong = h.m.urza.template("low_rank_adapter", ("B", 4))
            assert c.post("/seeds/1/germinate", json={"blueprint_id": wrong.blueprint_id}).status_code == 409
            assert c.post("/seeds/1/transition", json={"target": "CULLED"}).status_code == 409  # nothing to end
            assert c.post("/seeds/1/transition", json={"target": "FOSSILIZED"}).status_code == 409
            r = c.post("/seeds/1/germinate", json={"blueprint_id": bp.blueprint_id, "health": 0.2})
            assert r.status_code == 202 and r.json()["boundary"] == 1
            h.run_epoch()  # the command runs at this boundary
            assert h.state() == SeedState.GERMINATED and c.get("/seeds/1/status").json()["state"] == "GERMINATED"
            h.run_epoch()
            assert c.get("/seeds/1/status").json()["state"] == h.state() == SeedState.TRAINING
            assert c.post("/seeds/1/germinate", json={"blueprint_id": bp.blueprint_id}).status_code == 409
            assert c.post("/layers/1/unload_kernel").status_code == 202
            h.run_epoch()
            assert h.state() in (SeedState.CULLED, SeedState.ROLLED_BACK)
            assert h.m.kasmina.reports[-1].outcome == h.state()
            # A compiled kernel loads without compiling: DORMANT → GERMINATED → LOADING → TRAINING.
            while h.state() != SeedState.DORMANT:
                h.run_epoch()
            h.run_epoch()
            art = h.m.urza.meta.list_artifacts(bp.blueprint_id)[0]
            compiled = h.m.tezzeret.compiled
            assert c.post("/layers/1/load_kernel", json={"artifact_id": art.artifact_id}).status_code == 202
            h.run_epoch()
            assert h.state() == SeedState.GERMINATED
            h.run_epoch()
            assert h.state() == SeedState.TRAINING and h.m.tezzeret.compiled == compiled
            assert h.m.kasmina.seeds["1"].artifact_id == art.artifact_id
            assert c.post("/layers/1/load_kernel", json={"artifact_id": "c" * 64}).status_code == 404
    finally:
        h.close()
