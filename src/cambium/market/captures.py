"""Import third-party websocket captures into the recorder's format (frames kept byte for byte).

- hftbacktest collector files: one ``<local_receive_ns> <raw JSON>`` per line (the committed USDⓈ-M captures).
- cryptofeed raw ``*.ws.*`` files: a ``<url> <-> <ts>`` header, then ``<local_ts_seconds>: <raw JSON>`` lines.

These tools stamped only a wall clock, so the imported monotonic stamp equals the wall stamp; all frames go to shard 0.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cambium.core.errors import DataError
from cambium.market.recorder import Record, Recorder

__all__ = ["ImportReport", "import_capture", "iter_cryptofeed", "iter_hftbacktest"]


@dataclass(frozen=True)
class ImportReport:
    """How an import went: frames written, lines skipped (with the first few line numbers) and the recording."""

    frames: int
    skipped: int
    skipped_lines: tuple[int, ...]
    root: Path


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as fh:
            yield from fh
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as (gzipped) UTF-8 text: {exc}") from None


def _seconds_to_ns(text: str) -> int:
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise ValueError(text)
    return int(whole) * 10**9 + int((frac + "000000000")[:9])


def iter_hftbacktest(path: str | Path, skipped: list[int] | None = None) -> Iterator[Record]:
    """Records of an hftbacktest capture; lines without an integer stamp are skipped and their numbers collected."""
    for lineno, line in enumerate(_open_text(Path(path)), 1):
        stamp, sep, frame = line.rstrip("\n").partition(" ")
        if not sep or not stamp.isdigit() or not frame:
            if skipped is not None:
                skipped.append(lineno)
            continue
        ns = int(stamp)
        yield Record(ns, ns, 0, frame)


def iter_cryptofeed(path: str | Path, skipped: list[int] | None = None) -> Iterator[Record]:
    """Records of a cryptofeed raw websocket file (the header line is not a frame)."""
    for lineno, line in enumerate(_open_text(Path(path)), 1):
        if lineno == 1 and " <-> " in line:
            continue
        if not line.strip():
            continue
        stamp, sep, frame = line.rstrip("\n").partition(": ")
        try:
            ns = _seconds_to_ns(stamp)
        except ValueError:
            ns = -1
        if not sep or ns < 0 or not frame:
            if skipped is not None:
                skipped.append(lineno)
            continue
        yield Record(ns, ns, 0, frame)


def import_capture(path: str | Path, out: str | Path, *, kind: str = "hftbacktest") -> ImportReport:
    """Write the capture at `path` as a recording under `out` (an empty or new directory)."""
    readers = {"hftbacktest": iter_hftbacktest, "cryptofeed": iter_cryptofeed}
    if kind not in readers:
        raise DataError(f"capture kind {kind!r} is unknown; use one of {sorted(readers)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"capture {str(path)!r} does not exist")
    skipped: list[int] = []
    n = 0
    with Recorder(out, meta={"imported_from": path.name, "kind": kind}) as rec:
        for r in readers[kind](path, skipped):
            rec.write(r)
            n += 1
    return ImportReport(n, len(skipped), tuple(skipped[:20]), Path(out))
