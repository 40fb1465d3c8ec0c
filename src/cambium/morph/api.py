"""MOR-9: morph's HTTP API — the Urza, Tamiyo and Kasmina services as one FastAPI app with a router per service.

    Urza     POST /blueprints  GET /blueprints/{id}  GET /kernels/{id}  POST /kernels/{id}/status
    Tamiyo   POST /step  GET /policy/status  POST /policy/load  POST /analyze  GET /policy/version
             POST /policy/update  GET /decisions/history  POST /training/experience
    Kasmina  POST /seeds/{id}/germinate  GET /seeds/{id}/status  POST /seeds/{id}/transition
             POST /layers/{id}/load_kernel  GET /layers/{id}/stats  POST /layers/{id}/unload_kernel

Auth: every request requires `Authorization: Bearer <CAMBIUM_API_TOKEN>`, compared in constant time
(`hmac.compare_digest`); a missing or wrong token is 401 before routing, whatever the path or method. Without a token
the app accepts every caller, so `serve` refuses to bind it anywhere but loopback. The OpenAPI schema
(`/openapi.json`) and the docs page are public: they describe the API, they do not call it.

Bodies are parsed by the contracts themselves (strict JSON validation, unknown fields refused), not by FastAPI's
model binding, whose Python-mode validation would refuse the JSON arrays strict tuple fields are written as; their
JSON schemas are published under components/schemas all the same. Errors are one line in `{"detail": ...}`:
a malformed body or bad id 422, unknown seed/blueprint/kernel 404, a state that forbids the request 409, a backend
that is down 503.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from cambium.core.errors import CambiumError, ConfigError
from cambium.morph.bus import Bus
from cambium.morph.contracts import (
    Blueprint,
    CompiledKernelArtifact,
    FieldReport,
    HealthSignal,
    Seed,
    SystemStatePacket,
    parse,
)
from cambium.morph.errors import BackendError
from cambium.morph.library import ArtifactError, Urza
from cambium.morph.services import (
    Analysis,
    BlueprintSubmission,
    CommandAccepted,
    ConflictError,
    DecisionRecord,
    ExperienceAck,
    GerminateRequest,
    KasminaGateway,
    KernelStatusUpdate,
    LoadKernelRequest,
    NotFoundError,
    PolicyLoad,
    PolicyStatus,
    PolicyUpdate,
    PolicyVersion,
    TamiyoService,
    TransitionRequest,
)

__all__ = ["MAX_BODY_BYTES", "PUBLIC", "check_bind", "create_app"]

M = TypeVar("M", bound=BaseModel)
MAX_BODY_BYTES = 4 << 20
_SHA = r"^[0-9a-f]{64}$"
_SEED = r"^[A-Za-z0-9_.\-]{1,200}$"
PUBLIC = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_SCHEMAS: list[type[BaseModel]] = [
    Analysis, Blueprint, BlueprintSubmission, CommandAccepted, CompiledKernelArtifact, DecisionRecord, ExperienceAck,
    FieldReport, GerminateRequest, HealthSignal, KernelStatusUpdate, LoadKernelRequest, PolicyLoad, PolicyStatus,
    PolicyUpdate, PolicyVersion, Seed, SystemStatePacket, TransitionRequest,
]

Sha = Annotated[str, PathParam(pattern=_SHA, description="sha256 hex digest")]
SeedId = Annotated[str, PathParam(pattern=_SEED, description="seed id (the dotted location of its slot)")]


def check_bind(host: str, token: str | None) -> None:
    """Refuse (ConfigError) to serve without a token on anything but a loopback address."""
    if token is not None:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"refusing to serve on {host!r} without CAMBIUM_API_TOKEN: set a token (every call then "
                          "needs `Authorization: Bearer <token>`) or bind to 127.0.0.1")


def _authorized(header: str | None, token: str) -> bool:
    """`header` is `Bearer <token>`; the token is compared in constant time (no early exit on the first wrong byte)."""
    scheme, _, given = (header or "").partition(" ")
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    return ok and scheme.lower() == "bearer"


def _body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    async def read(request: Request) -> M:
        # Streamed with a cap, so a huge or endless body costs at most MAX_BODY_BYTES of memory.
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise HTTPException(413, f"body exceeds {MAX_BODY_BYTES} bytes")
        return parse(model, bytes(raw))

    return read


def _takes(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _out(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


def _returns(model: type[BaseModel], status: int = 200, *errors: int) -> dict[str, Any]:
    """OpenAPI responses: `model` on success, {"detail": str} on each error status."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"description": "OK", "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
    }
    for code in (401, 413, 422, 503, *errors):
        out[code] = {"description": "error", "content": {"application/json": {"schema": {
            "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}}
    return {"responses": out, "status_code": status}


def create_app(urza: Urza, bus: Bus, *, token: str | None, tamiyo: TamiyoService | None = None,
               kasmina: KasminaGateway | None = None) -> FastAPI:
    """The app over `urza` and `bus`; `token` None accepts every caller (bind it to loopback only)."""
    tamiyo = tamiyo or TamiyoService(urza)
    gateway = kasmina or KasminaGateway(bus, urza)
    app = FastAPI(title="cambium morph services", version="1", description=__doc__)
    app.state.tamiyo, app.state.kasmina, app.state.urza = tamiyo, gateway, urza

    @app.middleware("http")
    async def _require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # Before routing: a caller without the token learns nothing, not even which paths or methods exist.
        if (token is not None and request.url.path not in PUBLIC
                and not _authorized(request.headers.get("authorization"), token)):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(CambiumError)
    async def _cambium_error(_: Request, exc: CambiumError) -> JSONResponse:
        if isinstance(exc, NotFoundError | ArtifactError):
            code = 404
        elif isinstance(exc, ConflictError):
            code = 409
        elif isinstance(exc, BackendError):
            code = 503
        else:
            code = 422
        return JSONResponse({"detail": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
                            status_code=code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(problems)[:2000]}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    urza_r = APIRouter(tags=["urza"])

    @urza_r.post("/blueprints", openapi_extra=_takes(BlueprintSubmission), **_returns(Blueprint, 201))
    def add_blueprint(sub: Annotated[BlueprintSubmission, Depends(_body(BlueprintSubmission))]) -> JSONResponse:
        """Store a blueprint graph (shapes checked); storing the same graph again returns the stored record."""
        if sub.parent_id is not None and urza.meta.get_blueprint(sub.parent_id) is None:
            raise NotFoundError(f"parent blueprint {sub.parent_id[:12]}... is not in the library")
        return _out(urza.add_blueprint(sub.name, sub.family, sub.ir, parent_id=sub.parent_id), 201)

    @urza_r.get("/blueprints/{blueprint_id}", **_returns(Blueprint, 200, 404))
    def get_blueprint(blueprint_id: Sha) -> JSONResponse:
        return _out(urza.blueprint(blueprint_id))

    @urza_r.get("/kernels/{artifact_id}", **_returns(CompiledKernelArtifact, 200, 404))
    def get_kernel(artifact_id: Sha) -> JSONResponse:
        """The kernel's record (the payload travels through the artifact store, hash-verified on load)."""
        record = urza.meta.get_artifact(artifact_id)
        if record is None:
            raise NotFoundError(f"kernel {artifact_id[:12]}... is not in the library")
        return _out(record)

    @urza_r.post("/kernels/{artifact_id}/status", openapi_extra=_takes(KernelStatusUpdate),
                 **_returns(CompiledKernelArtifact, 200, 404))
    def set_kernel_status(artifact_id: Sha,
                          update: Annotated[KernelStatusUpdate, Depends(_body(KernelStatusUpdate))]) -> JSONResponse:
        return _out(urza.set_kernel_status(artifact_id, update.status))

    tamiyo_r = APIRouter(tags=["tamiyo"])

    @tamiyo_r.post("/step", openapi_extra=_takes(SystemStatePacket), **_returns(DecisionRecord))
    def step(packet: Annotated[SystemStatePacket, Depends(_body(SystemStatePacket))]) -> JSONResponse:
        """Decide on an epoch boundary's state; the decision is kept in the history."""
        return _out(tamiyo.step(packet))

    @tamiyo_r.post("/analyze", openapi_extra=_takes(SystemStatePacket), **_returns(Analysis))
    def analyze(packet: Annotated[SystemStatePacket, Depends(_body(SystemStatePacket))]) -> JSONResponse:
        """What the policy would decide and why each seed is or is not a candidate; nothing is recorded."""
        return _out(tamiyo.analyze(packet))

    @tamiyo_r.get("/policy/status", **_returns(PolicyStatus))
    def policy_status() -> JSONResponse:
        return _out(tamiyo.status())

    @tamiyo_r.get("/policy/version", **_returns(PolicyVersion))
    def policy_version() -> JSONResponse:
        return _out(tamiyo.policy_version())

    @tamiyo_r.post("/policy/load", openapi_extra=_takes(PolicyLoad), **_returns(PolicyVersion, 200, 404, 409))
    def policy_load(request: Annotated[PolicyLoad, Depends(_body(PolicyLoad))]) -> JSONResponse:
        """The heuristic with these settings, or (kind 'gnn') a Simic policy file inside the library root, its
        tensors verified against the hash in its header (a bad file is a 422, a missing one a 404)."""
        return _out(tamiyo.load(request))

    @tamiyo_r.post("/policy/update", openapi_extra=_takes(PolicyUpdate), **_returns(PolicyVersion))
    def policy_update(request: Annotated[PolicyUpdate, Depends(_body(PolicyUpdate))]) -> JSONResponse:
        return _out(tamiyo.update(request))

    history = _returns(DecisionRecord)["responses"]
    history[200]["content"]["application/json"]["schema"] = {
        "type": "array", "items": {"$ref": "#/components/schemas/DecisionRecord"}}

    @tamiyo_r.get("/decisions/history", responses=history)
    def decisions_history(limit: Annotated[int, Query(ge=0, le=1000)] = 100) -> JSONResponse:
        """The most recent decisions, oldest first."""
        return JSONResponse([r.model_dump(mode="json") for r in tamiyo.decisions(limit)])

    @tamiyo_r.post("/training/experience", openapi_extra=_takes(FieldReport), **_returns(ExperienceAck, 201))
    def training_experience(report: Annotated[FieldReport, Depends(_body(FieldReport))]) -> JSONResponse:
        """Append an adaptation's outcome to Simic's replay buffer in Urza."""
        return _out(tamiyo.experience(report), 201)

    kasmina_r = APIRouter(tags=["kasmina"])

    @kasmina_r.post("/seeds/{seed_id}/germinate", openapi_extra=_takes(GerminateRequest),
                    **_returns(CommandAccepted, 202, 404, 409))
    def germinate(seed_id: SeedId, request: Annotated[GerminateRequest, Depends(_body(GerminateRequest))]
                  ) -> JSONResponse:
        """Ask Kasmina to germinate a DORMANT seed with a library blueprint at its next epoch boundary."""
        return _out(gateway.germinate(seed_id, request), 202)

    @kasmina_r.get("/seeds/{seed_id}/status", **_returns(Seed, 200, 404))
    def seed_status(seed_id: SeedId) -> JSONResponse:
        """The seed as Kasmina last reported it (at the last epoch boundary)."""
        return _out(gateway.seed(seed_id))

    @kasmina_r.post("/seeds/{seed_id}/transition", openapi_extra=_takes(TransitionRequest),
                    **_returns(CommandAccepted, 202, 404, 409))
    def transition(seed_id: SeedId, request: Annotated[TransitionRequest, Depends(_body(TransitionRequest))]
                   ) -> JSONResponse:
        return _out(gateway.transition(seed_id, request), 202)

    @kasmina_r.post("/layers/{seed_id}/load_kernel", openapi_extra=_takes(LoadKernelRequest),
                    **_returns(CommandAccepted, 202, 404, 409))
    def load_kernel(seed_id: SeedId, request: Annotated[LoadKernelRequest, Depends(_body(LoadKernelRequest))]
                    ) -> JSONResponse:
        """Start an adaptation at the layer's seed with an already compiled kernel."""
        return _out(gateway.load_kernel(seed_id, request), 202)

    @kasmina_r.get("/layers/{seed_id}/stats", **_returns(HealthSignal, 200, 404))
    def layer_stats(seed_id: SeedId) -> JSONResponse:
        """The layer's last epoch telemetry."""
        return _out(gateway.stats(seed_id))

    @kasmina_r.post("/layers/{seed_id}/unload_kernel", **_returns(CommandAccepted, 202, 404, 409))
    def unload_kernel(seed_id: SeedId) -> JSONResponse:
        return _out(gateway.unload_kernel(seed_id), 202)

    for router in (urza_r, tamiyo_r, kasmina_r):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in _SCHEMAS],
                                         ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {})
            components.setdefault("schemas", {}).update(defs["$defs"])
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                        "description": "CAMBIUM_API_TOKEN"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

