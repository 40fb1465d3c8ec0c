"""Run directories and the experiments registry.

Every training, build, pipeline or replay run owns `<root>/<run_id>/` (usually `runs/<run_id>/`):

    config.toml       the resolved config (`cambium.core.config.to_toml`)
    provenance.json   git commit and dirty flag, package versions, host, command line, data file hashes, seed,
                      config fingerprint; one entry per resume under "resumes"
    metrics.duckdb    metrics (`cambium.core.metrics`), or `metrics.rank{r}.duckdb` per rank
    checkpoints/      atomic step directories (`cambium.core.checkpoint`)

and one row in `<root>/experiments.sqlite`. Run ids sort by creation time: `20261122-031500-moe-tiny-3f2a` is the
UTC time, the system, the config name and four random hex digits.

The registry is `cambium.core.registry` (all SQL in `SQLiteRegistry`, behind the `RunRegistry` interface). A run
killed with SIGKILL cannot mark itself: `list_runs`/`get_run` report a "running" run whose process is gone (same
host, pid no longer alive or reused) as "killed".
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from pydantic import BaseModel

from cambium.core.config import fingerprint, to_toml
from cambium.core.errors import DataError, RunError
from cambium.core.files import atomic_write, file_sha256
from cambium.core.registry import RunRecord, RunRegistry, SQLiteRegistry

__all__ = [
    "REGISTRY_FILE",
    "STATUSES",
    "Run",
    "create_run",
    "finish_run",
    "get_run",
    "list_runs",
    "new_run_id",
    "open_run",
    "run_handle",
    "update_config",
]

REGISTRY_FILE = "experiments.sqlite"
STATUSES = ("running", "finished", "failed", "killed")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSIONED_PACKAGES = ("cambium", "torch", "numpy", "pydantic", "duckdb", "pyarrow", "typer")


@dataclass
class Run:
    """A live handle on a run directory. Use as a context manager to mark it finished, failed or killed on exit."""

    id: str
    dir: Path
    root: Path
    system: str
    name: str
    seed: int
    registry: RunRegistry

    @property
    def config_path(self) -> Path:
        return self.dir / "config.toml"

    @property
    def provenance_path(self) -> Path:
        return self.dir / "provenance.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def metrics_path(self, rank: int | None = None) -> Path:
        """`metrics.duckdb`, or `metrics.rank{r}.duckdb` when each rank writes its own file."""
        return self.dir / ("metrics.duckdb" if rank is None else f"metrics.rank{int(rank)}.duckdb")

    def finish(self, status: str = "finished", summary: Mapping[str, Any] | None = None) -> None:
        _set_status(self.registry, self.id, status, summary)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        record = self.registry.get(self.id)
        if record is None or record.status != "running":
            return
        if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
            self.finish("finished")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            self.finish("killed", {"error": repr(exc)})
        else:
            self.finish("failed", {"error": repr(exc)})


def new_run_id(system: str, name: str, *, now: datetime | None = None) -> str:
    """`YYYYMMDD-HHMMSS-<system>-<name>-<4 hex>` in UTC; lexical order is creation order (to the second)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9]+", "-", f"{system}-{name}".lower()).strip("-") or "run"
    return f"{stamp}-{slug[:48]}-{secrets.token_hex(2)}"


def create_run(
    root: str | Path,
    *,
    system: str,
    name: str,
    config: BaseModel,
    seed: int,
    data_files: Iterable[str | Path] = (),
    run_id: str | None = None,
    registry: RunRegistry | None = None,
) -> Run:
    """Create `<root>/<run_id>/` with config.toml and provenance.json and register it as "running".

    `data_files` are hashed (sha256) into the provenance; a missing one raises DataError before anything is written.
    """
    root = Path(root)
    registry = registry or _default_registry(root)
    data = [_describe_file(Path(p)) for p in data_files]
    config_toml = to_toml(config)
    config_fp = fingerprint(config)
    root.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        _check_id(run_id)
        run_dir = root / run_id
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise RunError(f"run directory {str(run_dir)!r} already exists; pick another run id") from None
    else:
        for _ in range(100):
            run_id = new_run_id(system, name)
            run_dir = root / run_id
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 16 random bits within one second
            raise RunError(f"could not find a free run id under {root}")
    assert run_id is not None
    now = _now()
    proc = _process_identity()
    atomic_write(run_dir / "config.toml", config_toml)
    provenance = {
        "run_id": run_id,
        "system": system,
        "name": name,
        "created": now,
        "seed": seed,
        "config_fingerprint": config_fp,
        "git": _git_state(),
        "versions": _versions(),
        "host": proc["host"],
        "pid": proc["pid"],
        "command": list(sys.argv),
        "cwd": os.getcwd(),
        "data_files": data,
        "resumes": [],
    }
    atomic_write(run_dir / "provenance.json", json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    try:
        registry.insert(RunRecord(id=run_id, system=system, name=name, status="running", created=now, updated=now,
                                  fingerprint=config_fp, dir=run_dir.resolve(), **proc))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Run(id=run_id, dir=run_dir.resolve(), root=root, system=system, name=name, seed=seed, registry=registry)


def open_run(root: str | Path, run_id: str, *, config: BaseModel | None = None,
             registry: RunRegistry | None = None) -> Run:
    """Reopen an existing run to resume it: same directory, status back to "running", the resume noted in provenance.

    `run_id` may be a unique prefix. If `config` is given its fingerprint must equal the recorded one. A run still
    being trained by a live process on this host is refused: two writers would interleave checkpoints and metrics.
    """
    root = Path(root)
    registry = registry or _default_registry(root)
    record = _reconcile(registry, _resolve(registry, root, run_id))
    if (record.status == "running" and record.host == socket.gethostname() and record.pid != os.getpid()
            and _alive(record.pid, record.pid_started)):
        raise RunError(f"run {record.id!r} is still running in process {record.pid} on this host; stop it before "
                       "resuming")
    if not record.dir.is_dir():
        raise RunError(f"run {record.id!r} is registered but its directory {str(record.dir)!r} is missing")
    if config is not None and fingerprint(config) != record.fingerprint:
        raise RunError(
            f"run {record.id!r} was created with config fingerprint {record.fingerprint[:12]}, the config given "
            f"has {fingerprint(config)[:12]}; resume with the run's own config.toml"
        )
    prov_path = record.dir / "provenance.json"
    try:
        provenance = json.loads(prov_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {prov_path}: {exc}") from None
    proc = _process_identity()
    now = _now()
    provenance.setdefault("resumes", []).append(
        {"time": now, "host": proc["host"], "pid": proc["pid"], "command": list(sys.argv), "git": _git_state()}
    )
    atomic_write(prov_path, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    registry.update(record.id, status="running", updated=now, **proc)
    return Run(id=record.id, dir=record.dir, root=root, system=record.system, name=record.name,
               seed=int(provenance.get("seed", 0)), registry=registry)


def update_config(run: Run, config: BaseModel, changed: Sequence[str]) -> None:
    """Record a resumed run's changed config: config.toml rewritten, the fingerprint updated in the registry, and the
    changed keys noted in the provenance's last resume entry."""
    atomic_write(run.config_path, to_toml(config))
    try:
        provenance = json.loads(run.provenance_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {run.provenance_path}: {exc}") from None
    if provenance.get("resumes"):
        provenance["resumes"][-1]["changed"] = list(changed)
    provenance["config_fingerprint"] = fingerprint(config)
    atomic_write(run.provenance_path, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    run.registry.update(run.id, fingerprint=fingerprint(config), updated=_now())


def run_handle(root: str | Path, run_id: str, *, registry: RunRegistry | None = None) -> Run:
    """A handle on an existing run that changes nothing in it (the view of a rank other than 0 in a data-parallel
    run: it reads the run's directory and never writes the registry)."""
    root = Path(root)
    registry = registry or _default_registry(root)
    record = _locate(root, _resolve(registry, root, run_id))
    return Run(id=record.id, dir=record.dir, root=root, system=record.system, name=record.name, seed=0,
               registry=registry)


def finish_run(root: str | Path, run_id: str, status: str = "finished", summary: Mapping[str, Any] | None = None,
               *, registry: RunRegistry | None = None) -> None:
    """Set the final status ("finished", "failed" or "killed") and an optional JSON-able summary."""
    root = Path(root)
    registry = registry or _default_registry(root)
    _set_status(registry, _resolve(registry, root, run_id).id, status, summary)


def list_runs(root: str | Path, system: str | None = None, *, registry: RunRegistry | None = None) -> list[RunRecord]:
    """All registered runs under `root`, oldest first (empty if there is no registry yet)."""
    root = Path(root)
    registry = registry or _default_registry(root)
    return [_reconcile(registry, _locate(root, r)) for r in registry.find("", system)]


def get_run(root: str | Path, id_or_prefix: str, *, registry: RunRegistry | None = None) -> RunRecord:
    """The run with this id or unique id prefix; RunError listing the candidates otherwise."""
    root = Path(root)
    registry = registry or _default_registry(root)
    return _reconcile(registry, _resolve(registry, root, id_or_prefix))


def _default_registry(root: Path) -> RunRegistry:
    return SQLiteRegistry(root / REGISTRY_FILE)


def _resolve(registry: RunRegistry, root: Path, id_or_prefix: str) -> RunRecord:
    exact = registry.get(id_or_prefix)
    if exact is not None:
        return _locate(root, exact)
    matches = registry.find(id_or_prefix) if id_or_prefix else []
    if len(matches) == 1:
        return _locate(root, matches[0])
    if not matches:
        known = [r.id for r in registry.find("")][-10:]
        hint = f"; recent runs: {', '.join(known)}" if known else f"; no runs are registered under {root}"
        raise RunError(f"no run matches {id_or_prefix!r} in {root}{hint}")
    raise RunError(f"{id_or_prefix!r} is ambiguous, it matches {len(matches)} runs: "
                   f"{', '.join(r.id for r in matches[:20])}; give more of the id")


def _locate(root: Path, record: RunRecord) -> RunRecord:
    """The recorded directory, or `<root>/<id>` when the whole runs directory was moved or copied elsewhere."""
    if not record.dir.is_dir() and (root / record.id).is_dir():
        return RunRecord(**{**record.__dict__, "dir": (root / record.id).resolve()})
    return record


def _set_status(registry: RunRegistry, run_id: str, status: str, summary: Mapping[str, Any] | None) -> None:
    if status not in STATUSES:
        raise RunError(f"run status {status!r} is not one of {', '.join(STATUSES)}")
    fields: dict[str, Any] = {"status": status, "updated": _now()}
    if summary is not None:
        fields["summary"] = dict(summary)
    registry.update(run_id, **fields)


def _reconcile(registry: RunRegistry, record: RunRecord) -> RunRecord:
    """Mark a "running" run whose process died without saying so (SIGKILL, power loss on this host) as killed."""
    if record.status != "running" or record.host != socket.gethostname() or _alive(record.pid, record.pid_started):
        return record
    now = _now()
    # A read-only registry still gets the right answer; it just is not stored.
    with suppress(RunError):
        registry.update(record.id, status="killed", updated=now)
    return RunRecord(**{**record.__dict__, "status": "killed", "updated": now})


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.Error, ValueError):
        return False


def _process_identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_started": psutil.Process(pid).create_time()}


def _check_id(run_id: str) -> None:
    if not _ID_RE.match(run_id):
        raise RunError(f"run id {run_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-' "
                       "and start with a letter or digit")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _describe_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; cannot record its hash in the run provenance")
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _git_state(where: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding `where` (default: this source file); None when git is absent."""
    here = where or Path(__file__).resolve().parent
    state: dict[str, Any] = {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            state["commit"] = head.stdout.strip()
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0:
            state["dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions
