"""The services behind morph's HTTP API (cambium.morph.api), importable and testable without HTTP:

- `TamiyoService`: the controller as a service — decisions on posted SystemStatePackets with a bounded history, the
  policy's status and version, loading the heuristic or a Simic GNN policy file (inside the library root,
  hash-verified) or updating its settings, and Simic's experience intake (FieldReports appended to Urza's replay
  buffer).
- `TamiyoClient`: the trainer's side of a Tamiyo service — a `Policy` whose decisions come from `POST /step`.
- `KasminaGateway`: remote control of a running Kasmina over Oona. Commands go on control.kasmina.commands and run at
  the trainer's next epoch boundary (lifecycle changes happen only there, MOR-3); the view of seeds and their
  telemetry is rebuilt from system.events.epoch and telemetry.seed.health through the gateway's own consumer group.

Request and response bodies are frozen strict contracts like every other wire message.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from cambium.core.errors import CambiumError, ProtocolError
from cambium.morph.bus import Bus
from cambium.morph.config import PolicyConfig
from cambium.morph.contracts import (
    AdaptationSignal,
    BlueprintIR,
    CommandKind,
    Contract,
    FieldReport,
    HealthSignal,
    KasminaCommand,
    KernelStatus,
    Seed,
    SeedState,
    SystemStatePacket,
    parse,
)
from cambium.morph.controller import HeuristicPolicy
from cambium.morph.errors import BackendError, redact
from cambium.morph.library import ArtifactError, Urza

if TYPE_CHECKING:
    from cambium.morph.gnn import GnnPolicy

__all__ = [
    "Analysis",
    "BlueprintSubmission",
    "CommandAccepted",
    "ConflictError",
    "DecisionRecord",
    "ExperienceAck",
    "GerminateRequest",
    "KasminaGateway",
    "KernelStatusUpdate",
    "LoadKernelRequest",
    "NotFoundError",
    "PolicyLoad",
    "PolicyStatus",
    "PolicyUpdate",
    "PolicyVersion",
    "TamiyoClient",
    "TamiyoService",
    "TransitionRequest",
]

_SHA256 = r"^[0-9a-f]{64}$"


class NotFoundError(CambiumError):
    """The seed, blueprint or kernel named in a request does not exist."""


class ConflictError(CambiumError):
    """The request is well-formed but the current state forbids it (e.g. loading a kernel that is not READY)."""


class BlueprintSubmission(Contract):
    """POST /blueprints: a blueprint graph for the library (its id is the sha256 of the IR)."""

    name: str = Field(min_length=1, max_length=200, description="human name")
    family: str = Field(min_length=1, max_length=200, description="template family")
    ir: BlueprintIR = Field(description="the graph; shapes are checked")
    parent_id: str | None = Field(default=None, pattern=_SHA256, description="blueprint this one was mutated from")


class KernelStatusUpdate(Contract):
    status: KernelStatus = Field(description="new status of the kernel")


class PolicyLoad(Contract):
    """POST /policy/load: replace the policy."""

    kind: Literal["heuristic", "gnn"] = Field(description="'heuristic', or 'gnn': a policy file Simic wrote")
    config: PolicyConfig = Field(default_factory=PolicyConfig,
                                 description="heuristic thresholds and blueprint lists (gnn: its blueprint mask)")
    path: str | None = Field(default=None, min_length=1, max_length=1000,
                             description="kind 'gnn': the policy file, relative to the library root")
    max_adaptations_per_epoch: int = Field(default=2, ge=0, le=1000, description="germinations per boundary")


class PolicyUpdate(Contract):
    """POST /policy/update: change some settings of the current policy (unset fields keep their value)."""

    health_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    max_adaptations_per_epoch: int | None = Field(default=None, ge=0, le=1000)


class PolicyVersion(Contract):
    kind: str
    version: int = Field(ge=1, description="bumped by every load and update")
    config_sha256: str = Field(description="sha256 of the policy's settings JSON")


class PolicyStatus(Contract):
    kind: str
    version: int
    decisions: int = Field(description="decisions made through POST /step")
    max_adaptations_per_epoch: int
    config: PolicyConfig
    mean_latency_ms: float | None = Field(description="mean decision latency so far")
    replay_buffer: int = Field(description="FieldReports in Urza's replay buffer")


class DecisionRecord(Contract):
    policy_version: int
    epoch: int
    step: int
    decided_at: float
    latency_ms: float
    signals: tuple[AdaptationSignal, ...]


class Analysis(Contract):
    """POST /analyze: what the policy would decide, and why each seed is or is not a candidate (nothing recorded)."""

    signals: tuple[AdaptationSignal, ...]
    seeds: dict[str, str]


class ExperienceAck(Contract):
    buffer_size: int = Field(ge=1, description="FieldReports in the replay buffer after this one")


class GerminateRequest(Contract):
    blueprint_id: str = Field(pattern=_SHA256, description="library blueprint to graft")
    health: float = Field(default=0.0, ge=0.0, le=1.0, description="health score that motivated it")


class TransitionRequest(Contract):
    """Only the transitions an operator may force: CULLED (cull, or roll back once blended) and ROLLED_BACK; every
    other edge is taken by the lifecycle's own gates."""

    target: SeedState
    reason: str = Field(default="", max_length=500)


class LoadKernelRequest(Contract):
    artifact_id: str = Field(pattern=_SHA256, description="a READY kernel in the library")


class CommandAccepted(Contract):
    command_id: str
    kind: CommandKind
    seed_id: str
    boundary: int = Field(description="epoch boundary at which Kasmina runs it (the next one it reaches)")


class TamiyoService:
    def __init__(self, urza: Urza, cfg: PolicyConfig | None = None, max_adaptations_per_epoch: int = 2,
                 history: int = 1000, *, policy_root: str | Path | None = None) -> None:
        """`policy_root`: the directory GNN policy files are loaded from (default: a local library's root)."""
        self.urza = urza
        root = policy_root if policy_root is not None else getattr(urza.objects, "root", None)
        self.policy_root = Path(root) if root is not None else None
        self.policy: HeuristicPolicy | GnnPolicy = HeuristicPolicy(cfg or PolicyConfig(), max_adaptations_per_epoch)
        self.kind = "heuristic"
        self.version = 1
        self.history: deque[DecisionRecord] = deque(maxlen=history)
        self._lock = threading.Lock()

    def step(self, packet: SystemStatePacket) -> DecisionRecord:
        with self._lock:
            signals = self.policy.decide(packet)
            record = DecisionRecord(
                policy_version=self.version, epoch=packet.epoch, step=packet.step, decided_at=time.time(),
                latency_ms=self.policy.latencies_ms[-1], signals=tuple(signals),
            )
            self.history.append(record)
            return record

    def analyze(self, packet: SystemStatePacket) -> Analysis:
        with self._lock:
            # A copy: leaves the latencies alone.
            probe = (self.policy.with_settings(self.policy.cfg, self.policy.max_adaptations)
                     if not isinstance(self.policy, HeuristicPolicy)
                     else HeuristicPolicy(self.policy.cfg, self.policy.max_adaptations))
            return Analysis(signals=tuple(probe.decide(packet)), seeds=probe.explain(packet))

    def _gnn(self, request: PolicyLoad) -> GnnPolicy:
        from cambium.morph.gnn import GnnPolicy  # torch_geometric only once a GNN is loaded

        if request.path is None:
            raise ProtocolError("kind 'gnn' needs path: the policy file (relative to the library root)")
        if self.policy_root is None:
            raise ConflictError("this Tamiyo has no local library directory to load policy files from")
        root = self.policy_root.resolve()
        try:
            target = (root / request.path).resolve()
            inside = target.is_relative_to(root) and not Path(request.path).is_absolute()
            exists = inside and target.is_file()
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"path {request.path[:80]!r} is not a usable file name: {exc}") from None
        if not inside:
            raise ProtocolError(f"path {request.path[:80]!r} must name a file inside the library root")
        if not exists:
            raise NotFoundError(f"no policy file {request.path[:80]!r} in the library root")
        return GnnPolicy.from_file(target, request.config, request.max_adaptations_per_epoch)

    def load(self, request: PolicyLoad) -> PolicyVersion:
        policy = (self._gnn(request) if request.kind == "gnn"
                  else HeuristicPolicy(request.config, request.max_adaptations_per_epoch))
        with self._lock:
            self.policy = policy
            self.kind = request.kind
            self.version += 1
        return self.policy_version()

    def update(self, request: PolicyUpdate) -> PolicyVersion:
        changes = {k: v for k, v in request.model_dump().items() if v is not None and k != "max_adaptations_per_epoch"}
        with self._lock:
            try:
                cfg = PolicyConfig.model_validate({**self.policy.cfg.model_dump(), **changes})
            except ValueError as exc:
                raise ProtocolError(f"policy update {changes} is invalid: {exc}") from None
            limit = request.max_adaptations_per_epoch
            budget = self.policy.max_adaptations if limit is None else limit
            self.policy = (self.policy.with_settings(cfg, budget) if not isinstance(self.policy, HeuristicPolicy)
                           else HeuristicPolicy(cfg, budget))
            self.version += 1
        return self.policy_version()

    def policy_version(self) -> PolicyVersion:
        with self._lock:
            settings = self.policy.cfg.model_dump_json() + f"|{self.policy.max_adaptations}"
            if not isinstance(self.policy, HeuristicPolicy):
                settings += "|" + str(self.policy.header["tensors_sha256"])
            return PolicyVersion(kind=self.kind, version=self.version,
                                 config_sha256=hashlib.sha256(settings.encode()).hexdigest())

    def status(self) -> PolicyStatus:
        with self._lock:
            lat = self.policy.latencies_ms
            kind, version, cfg, limit = self.kind, self.version, self.policy.cfg, self.policy.max_adaptations
            decisions, mean = len(lat), (sum(lat) / len(lat) if lat else None)
        return PolicyStatus(kind=kind, version=version, decisions=decisions, max_adaptations_per_epoch=limit,
                            config=cfg, mean_latency_ms=mean, replay_buffer=len(self.urza.experience()))

    def decisions(self, limit: int) -> list[DecisionRecord]:
        with self._lock:
            return list(self.history)[-limit:] if limit > 0 else []

    def experience(self, report: FieldReport) -> ExperienceAck:
        return ExperienceAck(buffer_size=self.urza.record_experience(report))


class TamiyoClient:
    """A `Policy` (cambium.morph.controller) that asks a Tamiyo service (`cambium morph serve`) at `url` to decide.
    `latencies_ms` holds each decision's round trip. A service that is down or answers wrongly stops the trainer with
    one clear error rather than letting it go on without a controller (the run stays resumable)."""

    def __init__(self, url: str, token: str | None = None, *, timeout_s: float = 30.0) -> None:
        import httpx  # only the trainer's side of a remote controller needs a client

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout_s)
        self._errors: tuple[type[Exception], ...] = (httpx.HTTPError,)
        self.latencies_ms: list[float] = []

    def decide(self, packet: SystemStatePacket) -> list[AdaptationSignal]:
        t0 = time.perf_counter()
        try:
            reply = self._http.post("/step", content=packet.model_dump_json(),
                                    headers={"Content-Type": "application/json"})
        except self._errors as exc:
            raise BackendError(f"Tamiyo service at {redact(self.url)} is unreachable: {exc}") from None
        if reply.status_code != 200:
            raise BackendError(f"Tamiyo service at {redact(self.url)} answered {reply.status_code}: "
                               f"{reply.text[:300]}")
        record = parse(DecisionRecord, reply.content)
        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
        return list(record.signals)

    def close(self) -> None:
        self._http.close()


class KasminaGateway:
    """Commands to, and the last reported view of, the Kasmina of a running trainer sharing `bus`."""

    def __init__(self, bus: Bus, urza: Urza, *, group: str | None = None) -> None:
        self.bus = bus
        self.urza = urza
        self.group = group or f"kasmina-api-{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None
        self.seeds: dict[str, Seed] = {}
        self.health: dict[str, HealthSignal] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Fold in every epoch event and health signal published since the last call."""
        with self._lock:
            while batch := self.bus.read("system.events.epoch", self.group, count=500, consumer="api"):
                for message_id, event in batch:
                    if self.epoch is None or event.epoch >= self.epoch:
                        self.epoch = event.epoch
                        self.seeds = {s.seed_id: s for s in event.seeds}
                    self.bus.ack("system.events.epoch", self.group, message_id)
            while batch := self.bus.read("telemetry.seed.health", self.group, count=500, consumer="api"):
                for message_id, h in batch:
                    old = self.health.get(h.seed_id)
                    if old is None or h.epoch >= old.epoch:
                        self.health[h.seed_id] = h
                    self.bus.ack("telemetry.seed.health", self.group, message_id)

    def seed(self, seed_id: str) -> Seed:
        self.refresh()
        seed = self.seeds.get(seed_id)
        if seed is None:
            known = ", ".join(sorted(self.seeds)) or "none reported yet (no epoch has ended)"
            raise NotFoundError(f"no seed {seed_id[:80]!r}; seeds: {known}")
        return seed

    def stats(self, seed_id: str) -> HealthSignal:
        self.seed(seed_id)
        h = self.health.get(seed_id)
        if h is None:
            raise NotFoundError(f"seed {seed_id[:80]!r} has reported no telemetry yet")
        return h

    def _send(self, kind: CommandKind, seed: Seed, **fields: object) -> CommandAccepted:
        boundary = 0 if self.epoch is None else self.epoch + 1
        cmd = KasminaCommand.model_validate({
            "command_id": f"api-{uuid.uuid4().hex}", "kind": kind, "seed_id": seed.seed_id, "epoch": boundary,
            **fields,
        })
        self.bus.publish("control.kasmina.commands", cmd)
        return CommandAccepted(command_id=cmd.command_id, kind=kind, seed_id=seed.seed_id, boundary=boundary)

    def germinate(self, seed_id: str, request: GerminateRequest) -> CommandAccepted:
        seed = self.seed(seed_id)
        try:
            bp = self.urza.blueprint(request.blueprint_id)
        except ArtifactError as exc:
            raise NotFoundError(str(exc)) from None
        if seed.state != SeedState.DORMANT:
            raise ConflictError(f"seed {seed_id!r} is {seed.state.value}; only a DORMANT seed germinates")
        if tuple(bp.ir.input_shape) != tuple(seed.shape):
            raise ConflictError(f"blueprint {bp.name} takes {list(bp.ir.input_shape)}, seed {seed_id!r} sees "
                                f"{list(seed.shape)}")
        return self._send(CommandKind.GERMINATE, seed, blueprint_id=bp.blueprint_id, health=request.health)

    def transition(self, seed_id: str, request: TransitionRequest) -> CommandAccepted:
        seed = self.seed(seed_id)
        kinds = {SeedState.CULLED: CommandKind.CULL, SeedState.ROLLED_BACK: CommandKind.ROLLBACK}
        if request.target not in kinds:
            raise ConflictError(f"target {request.target.value} cannot be commanded; only CULLED and ROLLED_BACK "
                                "(every other transition is taken by the lifecycle's gates at a boundary)")
        self._check_active(seed)
        return self._send(kinds[request.target], seed)

    def load_kernel(self, seed_id: str, request: LoadKernelRequest) -> CommandAccepted:
        seed = self.seed(seed_id)
        record = self.urza.meta.get_artifact(request.artifact_id)
        if record is None:
            raise NotFoundError(f"kernel {request.artifact_id[:12]}... is not in the library")
        if record.status != KernelStatus.READY:
            raise ConflictError(f"kernel {request.artifact_id[:12]}... is {record.status.value}, not READY")
        if seed.state != SeedState.DORMANT:
            raise ConflictError(f"seed {seed_id!r} is {seed.state.value}; a kernel loads into a DORMANT seed")
        return self._send(CommandKind.LOAD_KERNEL, seed, artifact_id=record.artifact_id)

    def unload_kernel(self, seed_id: str) -> CommandAccepted:
        seed = self.seed(seed_id)
        self._check_active(seed)
        return self._send(CommandKind.CULL, seed)

    @staticmethod
    def _check_active(seed: Seed) -> None:
        if seed.state in (SeedState.DORMANT, SeedState.FOSSILIZED, SeedState.CULLED, SeedState.ROLLED_BACK):
            raise ConflictError(f"seed {seed.seed_id!r} is {seed.state.value}: no adaptation to end")
