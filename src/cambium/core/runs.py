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

The process that trains a run holds an exclusive `fcntl.flock` on `<run_dir>/run.lock` (the file holds its pid) from
`create_run`/`open_run` until the `Run` is closed or the process ends, so two resumes of one run cannot both go on:
the second is refused with the holder's pid. The kernel drops the lock of a dead process, SIGKILL included.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import psutil
from pydantic import BaseModel

from cambium.core.config import fingerprint, to_toml
from cambium.core.errors import DataError, RunError
from cambium.core.files import atomic_write, file_sha256
from cambium.core.registry import RunRecord, RunRegistry, SQLiteRegistry

__all__ = [
    "LOCK_FILE",
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
LOCK_FILE = "run.lock"
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
    lock: RunLock | None = None

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

    def close(self) -> None:
        """Release the run's lock (another process may then resume it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            record = self.registry.get(self.id)
            if record is None or record.status != "running":
                return
            if exc_type is None or (isinstance(exc, SystemExit) and exc.code in (0, None)):
                self.finish("finished")
            elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
                self.finish("killed", {"error": repr(exc)})
            else:
                self.finish("failed", {"error": repr(exc)})
        finally:
            self.close()


class RunLock:
    """An exclusive `flock` on `<run_dir>/run.lock`, held by one process (re-entrant within it) until released.

    flock locks belong to an open file, so a second open in the same process would conflict with the first: the
    process keeps one open file per lock file (by inode, so a moved runs directory is the same lock) and counts its
    holders.
    """

    _held: ClassVar[dict[tuple[int, int], tuple[int, int]]] = {}  # (dev, inode) -> (fd, holders) in this process

    def __init__(self, path: Path) -> None:
        self.path = path
        self._released = False
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            stat = os.fstat(fd)
        except OSError as exc:
            raise RunError(f"cannot open the lock file {str(path)!r} of run {path.parent.name!r}: {exc}") from None
        self._key = (stat.st_dev, stat.st_ino)
        held = RunLock._held.get(self._key)
        if held is not None:
            os.close(fd)
            RunLock._held[self._key] = (held[0], held[1] + 1)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if isinstance(exc, BlockingIOError):
                raise RunError(f"run {path.parent.name!r} is still running in process {holder} (it holds the "
                               f"lock {str(path)!r}); wait for it to end or stop it before resuming") from None
            raise RunError(f"cannot lock run {path.parent.name!r} ({str(path)!r}): {exc}") from None
        # One fixed-width write: a reader sees the old holder's pid or ours, never a mix or nothing.
        os.pwrite(fd, f"{os.getpid():<20}\n".encode(), 0)
        RunLock._held[self._key] = (fd, 1)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        fd, holders = RunLock._held.pop(self._key)
        if holders > 1:
            RunLock._held[self._key] = (fd, holders - 1)
            return
        with suppress(OSError):
            os.ftruncate(fd, 0)  # no stale pid for the next holder's rivals to read
        os.close(fd)  # closing the only open file drops the flock


def _read_holder(fd: int) -> str:
    """The pid in a lock file another process holds; it writes it just after locking, so wait for it briefly."""
    for _ in range(40):
        time.sleep(0.025)
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            break
        if text.isdigit():
            return text
    return "unknown"


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
    lock = RunLock(run_dir / LOCK_FILE)
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
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return Run(id=run_id, dir=run_dir.resolve(), root=root, system=system, name=name, seed=seed, registry=registry,
               lock=lock)


def open_run(root: str | Path, run_id: str, *, config: BaseModel | None = None,
             registry: RunRegistry | None = None) -> Run:
    """Reopen an existing run to resume it: same directory, status back to "running", the resume noted in provenance.

    `run_id` may be a unique prefix. If `config` is given its fingerprint must equal the recorded one. A run still
    being trained by a live process is refused: two writers would interleave checkpoints and metrics. The returned
    run holds the run's lock (`Run.close`, or the end of the process, releases it).
    """
    root = Path(root)
    registry = registry or _default_registry(root)
    record = _resolve(registry, root, run_id)
    if not record.dir.is_dir():
        raise RunError(f"run {record.id!r} is registered but its directory {str(record.dir)!r} is missing")
    # Lock first, then read the status: two resumes racing through the liveness check below cannot both pass.
    lock = RunLock(record.dir / LOCK_FILE)
    try:
        record = _reconcile(registry, _locate(root, registry.get(record.id) or record))
        if (record.status == "running" and record.host == socket.gethostname() and record.pid != os.getpid()
                and _alive(record.pid, record.pid_started)):
            raise RunError(f"run {record.id!r} is still running in process {record.pid} on this host; stop it "
                           "before resuming")
        if config is not None and fingerprint(config) != record.fingerprint:
            raise RunError(
                f"run {record.id!r} was created with config fingerprint {record.fingerprint[:12]}, the config given "
                f"has {fingerprint(config)[:12]}; resume with the run's own config.toml"
            )
        return _reopened(root, registry, record, lock)
    except BaseException:
        lock.release()
        raise


def _reopened(root: Path, registry: RunRegistry, record: RunRecord, lock: RunLock) -> Run:
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
               seed=int(provenance.get("seed", 0)), registry=registry, lock=lock)


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
    """`<root>/<id>` when it exists, else the recorded directory. A runs directory that was moved or copied elsewhere
    holds the original's absolute paths in its registry: the copy's own run directory wins, so that resuming a run in
    a copy never writes into the original."""
    here = root / record.id
    if here.is_dir() and here.resolve() != record.dir:
        return RunRecord(**{**record.__dict__, "dir": here.resolve()})
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
