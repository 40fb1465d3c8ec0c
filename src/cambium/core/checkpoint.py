"""Atomic directory checkpoints holding everything needed to resume bit for bit.

A checkpoint of step 1200 is the directory `<dir>/step_00001200/`:

    <name>.pt     one state dict per entry of `state` (model, optimizer, scheduler, ...), `torch.save` format
    rng.pt        python `random`, numpy global, named `np.random.Generator`s, torch CPU (and CUDA) RNG states
    cursor.json   the data cursor (a JSON-able dict: which shard, which offset, how many batches drawn)
    meta.json     step, time, size and sha256 of each file above; written last

It is written into `<dir>/.tmp-step_00001200-<pid>/`, every file fsynced, then renamed into place, so a crash leaves
either the old set of checkpoints or the new one, never half a checkpoint under a `step_*` name. A reader still
checks the hashes in meta.json (`latest_checkpoint` skips a checkpoint that fails, `load_checkpoint` raises
CheckpointError naming the path and the reason). Everything is readable with `torch.load(weights_only=True)`:
numpy RNG arrays are stored as lists of ints, never pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from cambium.core.errors import CheckpointError
from cambium.core.files import file_sha256

__all__ = [
    "Checkpoint",
    "capture_rng",
    "checkpoint_path",
    "cursor_int",
    "keep_last",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 1
META_FILE = "meta.json"
RNG_FILE = "rng.pt"
CURSOR_FILE = "cursor.json"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TEMP_RE = re.compile(r"^\.(?:tmp|trash)-step_\d{8,}-(\d+)$")
_STATE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = {"rng", "cursor", "meta"}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: `states[name]` is the state dict saved under `name`."""

    path: Path
    step: int
    states: dict[str, Any]
    rng: dict[str, Any]
    data_cursor: dict[str, Any]
    meta: dict[str, Any]

    def restore(self, objects: Mapping[str, Any] = {}, *, generators: Mapping[str, np.random.Generator] = {},
                rng: bool = True) -> None:
        """`load_state_dict` each object from the state saved under its name, then restore the RNG states."""
        for name, obj in objects.items():
            if name not in self.states:
                raise CheckpointError(f"{self.path}: no state named {name!r} (it holds {sorted(self.states)})")
            try:
                obj.load_state_dict(self.states[name])
            except (RuntimeError, KeyError, ValueError, TypeError) as exc:
                raise CheckpointError(f"{self.path}: state {name!r} does not fit the object given: {exc}") from None
        if rng:
            restore_rng(self.rng, generators)


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{int(step):08d}"


def save_checkpoint(
    directory: str | Path,
    step: int,
    state: Mapping[str, Any],
    *,
    data_cursor: Mapping[str, Any] | None = None,
    generators: Mapping[str, np.random.Generator] | None = None,
    keep: int | None = None,
    on_file_written: Callable[[Path], None] | None = None,
    attach: Mapping[str, Path] | None = None,
) -> Path:
    """Write `state` (name -> object with `state_dict()` or a state dict) as the checkpoint of `step`.

    The RNG states (global ones plus `generators`) and `data_cursor` are saved alongside. `keep` prunes to the last
    `keep` checkpoints afterwards. `on_file_written(path)` is called after each file of the temporary directory is
    written (the resume tests use it to stop the process mid-write). `attach` (subdirectory name -> directory)
    moves directories written beforehand, e.g. by every rank with torch.distributed.checkpoint, into the checkpoint;
    their files are listed and hashed in meta.json like the others. Returns the final directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint step {step!r} must be a non-negative int")
    for name in state:
        if not _STATE_NAME_RE.match(name) or name in _RESERVED:
            raise CheckpointError(f"checkpoint state name {name!r} must be a file-name-safe word other than "
                                  f"{sorted(_RESERVED)} (e.g. 'model', 'optimizer', 'scheduler')")
    try:
        cursor_text = json.dumps(dict(data_cursor or {}), sort_keys=True, indent=1)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"data_cursor must be a JSON-able dict: {exc}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    final = checkpoint_path(directory, step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    files: dict[str, dict[str, Any]] = {}

    def written(path: Path) -> None:
        files[path.name] = _fsync_and_describe(path)
        if on_file_written is not None:
            on_file_written(path)

    for sub, source in (attach or {}).items():
        if not _STATE_NAME_RE.match(sub) or sub in _RESERVED or sub in state:
            raise CheckpointError(f"attached directory name {sub!r} must be a file-name-safe word other than the "
                                  "state names")
        os.rename(source, tmp / sub)
        for path in sorted(p for p in (tmp / sub).rglob("*") if p.is_file()):
            files[str(path.relative_to(tmp))] = _fsync_and_describe(path)
    for name, obj in state.items():
        path = tmp / f"{name}.pt"
        torch.save(obj.state_dict() if hasattr(obj, "state_dict") else dict(obj), path)
        written(path)
    torch.save(capture_rng(generators), tmp / RNG_FILE)
    written(tmp / RNG_FILE)
    (tmp / CURSOR_FILE).write_text(cursor_text, encoding="utf-8")
    written(tmp / CURSOR_FILE)
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "unix_time": time.time(),
        "states": list(state),
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "torch": torch.__version__,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    _fsync_and_describe(tmp / META_FILE)
    _fsync_dir(tmp)
    if final.exists():
        # Re-saving a step (after resuming past a checkpoint that failed verification): move the old one aside
        # first because rename cannot replace a non-empty directory.
        trash = directory / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(directory)
    if keep is not None:
        keep_last(directory, keep)
    return final


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify and load a checkpoint directory (`torch.load(weights_only=True)` only)."""
    path = Path(path)
    meta = verify_checkpoint(path)
    states: dict[str, Any] = {}
    for name in meta["states"]:
        states[name] = _torch_load(path / f"{name}.pt", map_location)
    rng = _torch_load(path / RNG_FILE, "cpu")
    try:
        cursor = json.loads((path / CURSOR_FILE).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {CURSOR_FILE} is not valid JSON: {exc}") from None
    return Checkpoint(path=path, step=int(meta["step"]), states=states, rng=rng, data_cursor=cursor, meta=meta)


def verify_checkpoint(path: str | Path, *, hashes: bool = True) -> dict[str, Any]:
    """Return the meta of a complete checkpoint; CheckpointError with the path and the reason otherwise.

    With `hashes=False` only the presence and sizes of the files are checked (cheap, used when pruning).
    """
    path = Path(path)
    match = _STEP_RE.match(path.name)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    if match is None:
        raise CheckpointError(f"checkpoint {path}: directory name is not step_NNNNNNNN")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is missing (the write did not finish)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
        step = int(meta["step"])
        states = list(meta["states"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {META_FILE} is unreadable: {exc!r}") from None
    if step != int(match.group(1)):
        raise CheckpointError(f"checkpoint {path}: {META_FILE} says step {step}, the directory name another")
    for name in [*(f"{s}.pt" for s in states), RNG_FILE, CURSOR_FILE]:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {META_FILE} does not list {name}")
    for name, info in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: file {name} is missing")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"checkpoint {path}: file {name} has {size} bytes, {META_FILE} says {info['bytes']}")
        if hashes and file_sha256(file) != info["sha256"]:
            raise CheckpointError(f"checkpoint {path}: file {name} does not match its sha256 in {META_FILE} "
                                  "(corrupted); resume from an earlier checkpoint")
    return meta


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Every `step_*` directory (complete or not), by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path, *, verify: bool = True) -> Path | None:
    """The complete checkpoint with the highest step (temp dirs, missing meta and wrong hashes skipped), or None."""
    for path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path, hashes=verify)
        except CheckpointError:
            continue
        return path
    return None


def keep_last(directory: str | Path, n: int) -> list[Path]:
    """Delete all but the `n` newest complete checkpoints (and incomplete ones older than those). Returns removed."""
    if n < 1:
        raise CheckpointError(f"keep_last n={n} must be >= 1")
    paths = list_checkpoints(directory)
    complete = []
    for p in paths:
        try:
            verify_checkpoint(p, hashes=False)
            complete.append(p)
        except CheckpointError:
            pass
    if len(complete) <= n:
        return []
    oldest_kept = _step_of(complete[-n])
    removed = [p for p in paths if _step_of(p) < oldest_kept]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def capture_rng(generators: Mapping[str, np.random.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state as plain values and tensors (loadable with `weights_only=True`)."""
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": _encode(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": {name: _encode(gen.bit_generator.state) for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, np.random.Generator] | None = None) -> None:
    """Inverse of `capture_rng`; every generator in `generators` must have been captured under the same name."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state(_decode(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"no RNG state saved for generator {name!r} (saved: {sorted(saved)})")
        decoded = _decode(saved[name])
        kind = type(gen.bit_generator).__name__
        if decoded.get("bit_generator") != kind:
            raise CheckpointError(f"generator {name!r} is a {kind}, the checkpoint holds a "
                                  f"{decoded.get('bit_generator')!r} state")
        gen.bit_generator.state = decoded


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": value.dtype.str}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=np.dtype(value["dtype"]))
        return {k: _decode(v) for k, v in value.items()}
    return value


def _step_of(path: Path) -> int:
    match = _STEP_RE.match(path.name)
    assert match is not None
    return int(match.group(1))


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises a variety of types for a damaged zip or a refused pickle
        raise CheckpointError(f"checkpoint file {path} cannot be loaded: {exc}") from None


def _remove_stale_temps(directory: Path) -> None:
    """Remove temp/trash dirs left by a crashed save (any whose writer is this process or no longer alive)."""
    me = os.getpid()
    for p in directory.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and (int(m.group(1)) == me or not psutil.pid_exists(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_and_describe(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cursor_int(state: Any, key: str, *, low: int = 0, high: int | None = None, where: str = "data cursor") -> int:
    """`state[key]` of a data cursor read back from cursor.json, checked to be an integer in [low, high).

    A cursor is a file on disk: a tampered or damaged one is refused here with the key named (CheckpointError), before
    it can index out of range or seed an RNG with a negative number.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object holding {key!r}, got {type(state).__name__}")
    if key not in state:
        raise CheckpointError(f"{where}: {key!r} is missing")
    value = state[key]
    top = 2**63 if high is None else high
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < top:
        bound = f"< {high}" if high is not None else "< 2**63"
        raise CheckpointError(f"{where}: {key}={value!r} must be an integer >= {low} and {bound}")
    return value
