"""Urza, the asset library: blueprints and compiled kernels, content-addressed and verified on every load.

Storage sits behind two small interfaces so other backends can replace the embedded ones without touching callers:
- `ObjectStore` holds bytes under their sha256 (local directory here; an S3-compatible store at scale),
- `MetadataStore` holds Blueprint and CompiledKernelArtifact records (JSON files here; SQL at scale).

Layout of `LocalObjectStore(root)`: `root/objects/<sha[:2]>/<sha>`, written to a temporary name and renamed.
`JsonMetadataStore(root)`: `root/blueprints/<blueprint_id>.json`, `root/kernels/<artifact_id>.json`.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Protocol

from cambium.core.errors import DataError
from cambium.core.files import atomic_write
from cambium.morph.blueprints import make_blueprint
from cambium.morph.contracts import Blueprint, BlueprintIR, BlueprintStatus, CompiledKernelArtifact, parse
from cambium.morph.ir import infer_shapes, param_count

__all__ = ["ArtifactError", "JsonMetadataStore", "LocalObjectStore", "MetadataStore", "ObjectStore", "Urza"]


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
    def list_artifacts(self) -> list[CompiledKernelArtifact]: ...


class LocalObjectStore:
    """Bytes in a local directory, addressed by their sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, sha: str) -> Path:
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ArtifactError(f"{sha!r} is not a sha256 hex digest")
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
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise ArtifactError(
                f"artifact {path} hashes to {actual[:12]}..., not its address {sha[:12]}...: the file was modified or "
                "corrupted; delete it and compile the blueprint again"
            )
        return data

    def has(self, sha: str) -> bool:
        return self._path(sha).is_file()


class JsonMetadataStore:
    """Blueprint and kernel records as JSON files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def put_blueprint(self, bp: Blueprint) -> None:
        atomic_write(self.root / "blueprints" / f"{bp.blueprint_id}.json", bp.model_dump_json(indent=1).encode())

    def get_blueprint(self, blueprint_id: str) -> Blueprint | None:
        path = self.root / "blueprints" / f"{blueprint_id}.json"
        return parse(Blueprint, path.read_bytes()) if path.is_file() else None

    def list_blueprints(self) -> list[Blueprint]:
        return [parse(Blueprint, p.read_bytes()) for p in sorted((self.root / "blueprints").glob("*.json"))]

    def put_artifact(self, art: CompiledKernelArtifact) -> None:
        atomic_write(self.root / "kernels" / f"{art.artifact_id}.json", art.model_dump_json(indent=1).encode())

    def get_artifact(self, artifact_id: str) -> CompiledKernelArtifact | None:
        path = self.root / "kernels" / f"{artifact_id}.json"
        return parse(CompiledKernelArtifact, path.read_bytes()) if path.is_file() else None

    def list_artifacts(self) -> list[CompiledKernelArtifact]:
        return [parse(CompiledKernelArtifact, p.read_bytes()) for p in sorted((self.root / "kernels").glob("*.json"))]


class Urza:
    """The library facade used by Kasmina, Tezzeret and Karn. Thread-safe."""

    def __init__(self, objects: ObjectStore, meta: MetadataStore) -> None:
        self.objects = objects
        self.meta = meta
        self._lock = threading.Lock()

    @classmethod
    def local(cls, root: str | Path) -> Urza:
        return cls(LocalObjectStore(root), JsonMetadataStore(root))

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

    def kernel(self, artifact_id: str) -> tuple[CompiledKernelArtifact, bytes]:
        """The record and the verified payload bytes of a kernel."""
        record = self.meta.get_artifact(artifact_id)
        if record is None:
            raise ArtifactError(f"kernel {artifact_id[:12]}... has no record in the library")
        return record, self.objects.get(artifact_id)
