"""Urza, the asset library: blueprints and compiled kernels, content-addressed and verified on every load.

Storage sits behind two small interfaces so backends can be swapped without touching callers:
- `ObjectStore` holds bytes under their sha256: `LocalObjectStore` (a directory, the default) or
  `cambium.morph.s3_store.S3ObjectStore` (an S3-compatible store, `S3_ENDPOINT_URL`);
- `MetadataStore` holds Blueprint and CompiledKernelArtifact records and the FieldReport replay buffer:
  `cambium.morph.sql_store.SqlMetadataStore` over a SQLite file (the default) or PostgreSQL (`DATABASE_URL`).

Every object store verifies on `get` that the bytes hash to their address. `Urza.local(root)` is the embedded default:
`root/objects/<sha[:2]>/<sha>` (written to a temporary name and renamed) and `root/urza.sqlite`;
`cambium.morph.backends.open_urza` picks the backends from the environment.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Protocol

from cambium.core.errors import DataError
from cambium.core.files import atomic_write
from cambium.morph.blueprints import make_blueprint
from cambium.morph.contracts import (
    Blueprint,
    BlueprintIR,
    BlueprintStatus,
    CompiledKernelArtifact,
    FieldReport,
    KernelStatus,
)
from cambium.morph.ir import infer_shapes, param_count
from cambium.morph.sql_store import SqlMetadataStore

__all__ = ["ArtifactError", "LocalObjectStore", "MetadataStore", "ObjectStore", "Urza", "check_sha"]


class ArtifactError(DataError):
    """A stored artifact is missing or its bytes do not hash to its address (tampered or corrupt)."""


class ObjectStore(Protocol):
    def put(self, data: bytes) -> str: ...
    def get(self, sha: str) -> bytes: ...
    def has(self, sha: str) -> bool: ...


class MetadataStore(Protocol):
    def put_blueprint(self, bp: Blueprint) -> None: ...
    def get_blueprint(self, blueprint_id: str) -> Blueprint | None: ...
    def list_blueprints(self) -> list[Blueprint]: ...
    def put_artifact(self, art: CompiledKernelArtifact) -> None: ...
    def get_artifact(self, artifact_id: str) -> CompiledKernelArtifact | None: ...
    def list_artifacts(self, blueprint_id: str | None = None) -> list[CompiledKernelArtifact]: ...
    def add_field_report(self, report: FieldReport, *, key: str | None = None, run_id: str | None = None) -> int: ...
    def field_reports(self, limit: int | None = None) -> list[FieldReport]: ...
    def keyed_field_reports(self) -> list[tuple[str | None, FieldReport]]: ...
    def add_decision(self, run_id: str, epoch: int, key: str, record: str) -> None: ...
    def decisions(self) -> list[tuple[str, str]]: ...


def check_sha(sha: str) -> str:
    """`sha` if it is a lowercase sha256 hex digest (an object address), else ArtifactError."""
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ArtifactError(f"{sha[:80]!r} is not a sha256 hex digest")
    return sha


def verified(sha: str, data: bytes, where: str) -> bytes:
    """`data` when it hashes to its address `sha`; an ArtifactError naming `where` otherwise (every store's load)."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha:
        raise ArtifactError(f"artifact {sha[:12]}... in {where} hashes to {actual[:12]}...: it was modified or "
                            "corrupted; delete it and compile the blueprint again")
    return data


class LocalObjectStore:
    """Bytes in a local directory, addressed by their sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, sha: str) -> Path:
        check_sha(sha)
        return self.root / "objects" / sha[:2] / sha

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._path(sha)
        if not path.exists():
            atomic_write(path, data)
        return sha

    def get(self, sha: str) -> bytes:
        path = self._path(sha)
        if not path.is_file():
            raise ArtifactError(f"artifact {sha[:12]}... is not in {self.root}; compile the blueprint again")
        return verified(sha, path.read_bytes(), str(path))

    def has(self, sha: str) -> bool:
        return self._path(sha).is_file()


class Urza:
    """The library facade used by Kasmina, Tezzeret and Karn. Thread-safe."""

    def __init__(self, objects: ObjectStore, meta: MetadataStore) -> None:
        self.objects = objects
        self.meta = meta
        self._lock = threading.Lock()

    @classmethod
    def local(cls, root: str | Path) -> Urza:
        return cls(LocalObjectStore(root), SqlMetadataStore.sqlite(Path(root) / "urza.sqlite"))

    def add_blueprint(
        self, name: str, family: str, ir: BlueprintIR, *, parent_id: str | None = None,
        status: BlueprintStatus = BlueprintStatus.PROPOSED,
    ) -> Blueprint:
        """Validate shapes and store; adding an IR that is already there returns the stored record."""
        infer_shapes(ir)
        bp_id = ir.ir_hash()
        with self._lock:
            existing = self.meta.get_blueprint(bp_id)
            if existing is not None:
                return existing
            bp = Blueprint(
                blueprint_id=bp_id, name=name, family=family, ir=ir, status=status, parent_id=parent_id,
                param_count=param_count(ir),
            )
            self.meta.put_blueprint(bp)
            return bp

    def template(self, name: str, shape: tuple[int | str, ...]) -> Blueprint:
        """The library's blueprint `name` for an activation of `shape` (created from its template once)."""
        return self.add_blueprint(name, name, make_blueprint(name, shape))

    def blueprint(self, blueprint_id: str) -> Blueprint:
        bp = self.meta.get_blueprint(blueprint_id)
        if bp is None:
            raise ArtifactError(f"blueprint {blueprint_id[:12]}... is not in the library")
        return bp

    def set_status(self, blueprint_id: str, status: BlueprintStatus) -> Blueprint:
        with self._lock:
            bp = self.blueprint(blueprint_id).model_copy(update={"status": status})
            self.meta.put_blueprint(bp)
            return bp

    def store_kernel(self, payload: bytes, record: CompiledKernelArtifact) -> CompiledKernelArtifact:
        """Store the payload; `record.artifact_id` must be its sha256."""
        sha = self.objects.put(payload)
        if sha != record.artifact_id:
            raise ArtifactError(f"record says {record.artifact_id[:12]}... but the payload hashes to {sha[:12]}...")
        with self._lock:
            self.meta.put_artifact(record)
        return record

    def set_kernel_status(self, artifact_id: str, status: KernelStatus) -> CompiledKernelArtifact:
        with self._lock:
            record = self.meta.get_artifact(artifact_id)
            if record is None:
                raise ArtifactError(f"kernel {artifact_id[:12]}... has no record in the library")
            record = record.model_copy(update={"status": status})
            self.meta.put_artifact(record)
            return record

    def record_experience(self, report: FieldReport) -> int:
        """Append an adaptation's outcome to the replay buffer Simic trains from; returns the buffer's size."""
        return self.meta.add_field_report(report)

    def experience(self, limit: int | None = None) -> list[FieldReport]:
        return self.meta.field_reports(limit)

    def kernel(self, artifact_id: str) -> tuple[CompiledKernelArtifact, bytes]:
        """The record and the verified payload bytes of a kernel."""
        record = self.meta.get_artifact(artifact_id)
        if record is None:
            raise ArtifactError(f"kernel {artifact_id[:12]}... has no record in the library")
        return record, self.objects.get(artifact_id)
