"""Recordings of raw websocket frames: hourly gzip JSONL files plus a manifest with a sha256 per file.

One line per frame: ``{"t": recv_wall_ns, "m": recv_mono_ns, "s": shard, "f": "<frame text>"}``. The frame is kept as
the exact text received (a JSON string, so malformed frames survive too), which makes record → replay byte-identical.
Files are named by the UTC hour of their first frame's wall stamp (``20240808T23.jsonl.gz``); the gzip header carries
no name or time, so the same frames always give the same bytes and the same sha256. A file is written under a ``.part``
name and renamed when its hour ends or the recorder closes, and the manifest is rewritten atomically after each file,
so a manifest only ever lists complete files. A clock that steps back keeps writing into the current file (only a later
hour opens a new one), so hostile stamps cannot multiply files.

A recording is complete or refused (MKT-7): the manifest says ``"complete": false`` until `close()` after a writer
that did not fail sets it to true. `read_recording` (and so `replay`, `market serve` and the screener) refuses an
unfinished recording, a manifest entry that is not a plain file name inside the recording, a file whose sha256 does not
match, a gzip stream that is cut or corrupt and a line that is not a recording line, each in one line naming the file.
A recorder that was killed leaves its current hour as ``.part``; `recover` turns what can be decompressed of it
(everything up to the last `flush`) into a listed file and marks the recording complete (``"recovered": true``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
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

__all__ = ["MANIFEST", "MAX_LINE", "Record", "Recorder", "read_manifest", "read_recording", "recover", "replay"]

MANIFEST = "manifest.json"
FORMAT = "cambium.market.recording/1"
_HOUR_NS = 3600 * 10**9
_NS_MAX = 2**63  # receive stamps are int64 nanoseconds, as time.time_ns() gives them until 2262
MAX_LINE = 64 * 2**20  # a longer decompressed line is refused rather than held in memory
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.jsonl\.gz")


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
        self.complete = False
        self._closed = False
        self._write_manifest()

    def write(self, rec: Record) -> None:
        """Append one frame; a stamp that is not an int64 ns count or a frame that is not text is a `DataError`."""
        if self._closed:
            raise DataError(f"{self.root}: the recorder is closed; open a new one to record more")
        for what, v in (("receive stamp", rec.recv_ns), ("monotonic stamp", rec.mono_ns), ("shard", rec.shard)):
            if type(v) is not int or not 0 <= v < _NS_MAX:
                raise DataError(f"{what} {v!r} is not an integer in [0, 2**63) ns; the frame was not recorded")
        if not isinstance(rec.frame, str):
            raise DataError(f"frame {rec.frame!r:.80} is not text; the frame was not recorded")
        hour = rec.recv_ns // _HOUR_NS
        if self._hour is None or hour > self._hour:
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
        name = f"{_hour_name(recv_ns)}.jsonl.gz"  # unique: only a later hour opens a file
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
            "complete": self.complete,
        }
        atomic_write(self.root / MANIFEST, orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    def flush(self) -> None:
        """Push everything written so far to disk in a form `recover` can read back after a crash."""
        if self._gz is not None and self._raw is not None:
            self._gz.flush(zlib.Z_SYNC_FLUSH)
            self._raw.flush()

    def close(self, *, complete: bool = True) -> None:
        """Finish the current file; with `complete` also mark the recording complete. Later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        self._finish_file()
        if complete:
            self.complete = True
            self._write_manifest()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A writer that failed part-way leaves the frames it wrote listed but the recording unfinished, so no reader
        # mistakes a truncated recording for a whole one.
        self.close(complete=exc is None)


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
    doc["complete"] = doc["recovered"] = True
    atomic_write(root / MANIFEST, orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return recovered


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the recording at `root`, checked for shape (complete or not: see `read_recording`)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} is not a recording: {MANIFEST} is missing")
    try:
        doc = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{path}: format is {doc.get('format') if isinstance(doc, dict) else doc!r}, want {FORMAT}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise DataError(f"{path}: 'files' is {files!r:.80}, want a list of file entries")
    for i, entry in enumerate(files):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: files[{i}] is {entry!r:.80}, want an object")
        name = entry.get("name")
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
            raise DataError(f"{path}: files[{i}].name={name!r:.120} is not a plain '*.jsonl.gz' file name inside "
                            "the recording; refusing to read outside it")
        if not isinstance(entry.get("sha256"), str):
            raise DataError(f"{path}: files[{i}].sha256={entry.get('sha256')!r:.80} is not a hex digest")
    return doc


def _lines(path: Path, data: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of gzip `data`, decompressed a line at a time so a bomb cannot fill memory."""
    lineno = 0
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as fh:
            while line := fh.readline(MAX_LINE + 1):
                lineno += 1
                if len(line) > MAX_LINE:
                    raise DataError(f"{path}: line {lineno} is longer than {MAX_LINE} bytes; not a recording line")
                yield lineno, line
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: the gzip stream is cut or corrupt after line {lineno} ({exc}); "
                        "the file is damaged, restore or re-record it") from None


def _record(line: bytes) -> Record:
    d = orjson.loads(line)
    if not isinstance(d, dict):
        raise TypeError(f"a {type(d).__name__}, not an object")
    t, m, s, f = d["t"], d["m"], d["s"], d["f"]
    for key, v in (("t", t), ("m", m), ("s", s)):
        if type(v) is not int or not 0 <= v < _NS_MAX:
            raise ValueError(f"{key}={v!r:.40} is not an integer in [0, 2**63)")
    if not isinstance(f, str):
        raise TypeError(f"f={f!r:.40} is not text")
    return Record(t, m, s, f)


def read_recording(root: str | Path, *, verify: bool = True) -> Iterator[Record]:
    """Every frame of a complete recording in order; with `verify`, each file's sha256 is checked before it is read.

    Raises `DataError` naming the file for an unfinished recording and anything the module docstring lists.
    """
    root = Path(root)
    doc = read_manifest(root)
    if doc.get("complete") is not True:
        raise DataError(f"{root} is an unfinished recording ({MANIFEST} has no completion marker: its writer failed "
                        "or was killed); re-import or re-record it, or finish it with cambium.market.recorder.recover")
    real_root = root.resolve()
    for entry in doc["files"]:
        path = root / entry["name"]
        if path.resolve().parent != real_root:
            raise DataError(f"{path} leads outside the recording {root}; refusing to read it")
        if not path.is_file():
            raise DataError(f"{path} is listed in {MANIFEST} but missing")
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise DataError(f"{path}: sha256 does not match {MANIFEST}; the file is corrupt or was edited")
        for lineno, line in _lines(path, data):
            try:
                rec = _record(line)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path}: line {lineno} is not a recording line ({exc})") from None
            yield rec


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
