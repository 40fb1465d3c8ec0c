"""Recordings of raw websocket frames: hourly gzip JSONL files plus a manifest with a sha256 per file.

One line per frame: ``{"t": recv_wall_ns, "m": recv_mono_ns, "s": shard, "f": "<frame text>"}``. The frame is kept as
the exact text received (a JSON string, so malformed frames survive too), which makes record → replay byte-identical.
Files are named by the UTC hour of their first frame's wall stamp (``20240808T23.jsonl.gz``); the gzip header carries
no name or time, so the same frames always give the same bytes and the same sha256. A file is written under a ``.part``
name and renamed when its hour ends or the recorder closes, and the manifest is rewritten atomically after each file,
so a manifest only ever lists complete files. A recorder that was killed leaves its current hour as ``.part``;
`recover` turns what can be decompressed of it (everything up to the last `flush`) into a listed file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import orjson

from cambium.core.errors import DataError
from cambium.core.files import atomic_write

__all__ = ["MANIFEST", "Record", "Recorder", "read_manifest", "read_recording", "recover", "replay"]

MANIFEST = "manifest.json"
FORMAT = "cambium.market.recording/1"
_HOUR_NS = 3600 * 10**9


class Record(NamedTuple):
    """One received frame: wall-clock and monotonic receive stamps (ns), the shard it came on, its exact text."""

    recv_ns: int
    mono_ns: int
    shard: int
    frame: str


def _hour_name(recv_ns: int) -> str:
    return datetime.fromtimestamp(recv_ns // 10**9, UTC).strftime("%Y%m%dT%H")


class Recorder:
    """Append frames to hourly gzip JSONL files under `root` (created); call `close()` (or use `with`)."""

    def __init__(self, root: str | Path, *, meta: dict[str, Any] | None = None, compresslevel: int = 6) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / MANIFEST).exists() and read_manifest(self.root)["files"]:
            raise DataError(f"{self.root} already holds a recording; record into an empty directory")
        self.meta = dict(meta or {})
        self.compresslevel = compresslevel
        self.files: list[dict[str, Any]] = []
        self._hour: int | None = None
        self._raw: io.BufferedWriter | None = None
        self._gz: gzip.GzipFile | None = None
        self._sha = hashlib.sha256()
        self._name = ""
        self._count = 0
        self._first = 0
        self._last = 0
        self._write_manifest()

    def write(self, rec: Record) -> None:
        hour = rec.recv_ns // _HOUR_NS
        if hour != self._hour:
            self._finish_file()
            self._open_file(rec.recv_ns)
            self._hour = hour
        assert self._gz is not None
        self._gz.write(orjson.dumps({"t": rec.recv_ns, "m": rec.mono_ns, "s": rec.shard, "f": rec.frame}) + b"\n")
        if self._count == 0:
            self._first = rec.recv_ns
        self._count += 1
        self._last = rec.recv_ns

    def write_frame(self, frame: str, recv_ns: int, mono_ns: int, shard: int = 0) -> None:
        self.write(Record(recv_ns, mono_ns, shard, frame))

    def _open_file(self, recv_ns: int) -> None:
        base = _hour_name(recv_ns)
        taken = {f["name"] for f in self.files}
        name, k = f"{base}.jsonl.gz", 1
        while name in taken:  # the wall clock stepped back into an hour already written
            name, k = f"{base}-{k}.jsonl.gz", k + 1
        self._name = name
        self._sha = hashlib.sha256()
        self._raw = open(self.root / f"{name}.part", "wb")  # noqa: SIM115 - closed in _finish_file
        sha = self._sha
        raw = self._raw

        class _Tee(io.RawIOBase):
            def writable(self) -> bool:
                return True

            def write(self, b: Any) -> int:
                sha.update(b)
                return raw.write(b)

        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=_Tee(), compresslevel=self.compresslevel, mtime=0)
        self._count = 0

    def _finish_file(self) -> None:
        if self._gz is None or self._raw is None:
            return
        self._gz.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        size = self._raw.tell()
        self._raw.close()
        os.replace(self.root / f"{self._name}.part", self.root / self._name)
        self.files.append(
            {
                "name": self._name,
                "sha256": self._sha.hexdigest(),
                "bytes": size,
                "frames": self._count,
                "first_recv_ns": self._first,
                "last_recv_ns": self._last,
            }
        )
        self._gz = None
        self._raw = None
        self._write_manifest()

    def _write_manifest(self) -> None:
        doc = {
            "format": FORMAT,
            "meta": self.meta,
            "frames": sum(f["frames"] for f in self.files),
            "files": self.files,
        }
        atomic_write(self.root / MANIFEST, orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    def flush(self) -> None:
        """Push everything written so far to disk in a form `recover` can read back after a crash."""
        if self._gz is not None and self._raw is not None:
            self._gz.flush(zlib.Z_SYNC_FLUSH)
            self._raw.flush()

    def close(self) -> None:
        self._finish_file()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def recover(root: str | Path) -> int:
    """Finish the ``.part`` files a killed recorder left under `root`; return the number of frames recovered.

    Complete lines are kept; a line cut by the crash is dropped. The recovered files are appended to the manifest.
    """
    root = Path(root)
    doc = read_manifest(root)
    recovered = 0
    for part in sorted(root.glob("*.jsonl.gz.part")):
        data = zlib.decompressobj(wbits=31).decompress(part.read_bytes())
        lines = data.split(b"\n")[:-1]  # the last piece is cut or empty
        records = []
        for line in lines:
            try:
                d = orjson.loads(line)
                records.append(Record(d["t"], d["m"], d["s"], d["f"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                break
        tmp = root / ".recover"
        with Recorder(tmp, meta=doc.get("meta")) as rec:
            for r in records:
                rec.write(r)
        for entry in read_manifest(tmp)["files"]:
            name = part.name.removesuffix(".part")
            os.replace(tmp / entry["name"], root / name)
            doc["files"].append({**entry, "name": name})
        (tmp / MANIFEST).unlink()
        tmp.rmdir()
        part.unlink()
        recovered += len(records)
    doc["files"].sort(key=lambda f: f["first_recv_ns"])
    doc["frames"] = sum(f["frames"] for f in doc["files"])
    atomic_write(root / MANIFEST, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return recovered


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a recording: {MANIFEST} is missing")
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{path}: format is {doc.get('format') if isinstance(doc, dict) else doc!r}, want {FORMAT}")
    return doc


def read_recording(root: str | Path, *, verify: bool = True) -> Iterator[Record]:
    """Every frame of the recording in order; with `verify`, each file's sha256 is checked before it is read."""
    root = Path(root)
    for entry in read_manifest(root)["files"]:
        path = root / entry["name"]
        if not path.is_file():
            raise DataError(f"{path} is listed in {MANIFEST} but missing")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DataError(f"{path}: sha256 does not match {MANIFEST}; the file is corrupt or was edited")
        for lineno, line in enumerate(gzip.decompress(data).splitlines(), 1):
            try:
                d = orjson.loads(line)
                yield Record(d["t"], d["m"], d["s"], d["f"])
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}: line {lineno} is not a recording line ({exc})") from None


def replay(
    root: str | Path,
    *,
    speed: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> Iterator[Record]:
    """The recording in order: as fast as possible (`speed=None`) or paced at recorded speed × `speed`.

    Pacing follows the monotonic receive stamps; the pause before a frame is computed from the start of the replay,
    so the time spent by the consumer does not accumulate as drift.
    """
    if speed is not None and speed <= 0:
        raise DataError(f"speed={speed} must be > 0 (or None for as fast as possible)")
    start: float | None = None
    first_ns = 0
    for rec in read_recording(root):
        if speed is not None:
            if start is None:
                start, first_ns = monotonic(), rec.mono_ns
            due = start + (rec.mono_ns - first_ns) / 1e9 / speed
            wait = due - monotonic()
            if wait > 0:
                sleep(wait)
        yield rec
