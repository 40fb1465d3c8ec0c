"""Import third-party websocket captures into the recorder's format (frames kept byte for byte).

- hftbacktest collector files: one ``<local_receive_ns> <raw JSON>`` per line (the committed USDⓈ-M captures).
- cryptofeed raw ``*.ws.*`` files: a ``<url> <-> <ts>`` header, then ``<local_ts_seconds>: <raw JSON>`` lines.

These tools stamped only a wall clock, so the imported monotonic stamp equals the wall stamp; all frames go to shard 0.
A line without a stamp, with a stamp outside 2009..2100 (a far-future stamp would pace a replay for centuries) or
longer than the recorder accepts is skipped and counted; a file that is not (gzipped) UTF-8 text is refused in one line
and leaves the recording unfinished, which every reader refuses (MKT-7).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cambium.core.errors import DataError
from cambium.market.recorder import MAX_LINE, Record, Recorder

__all__ = ["ImportReport", "import_capture", "iter_cryptofeed", "iter_hftbacktest"]

STAMP_RANGE_NS = (1230940800 * 10**9, 4102444800 * 10**9)  # [2009-01-03, 2100-01-01) UTC
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class ImportReport:
    """How an import went: frames written, lines skipped (with the first few line numbers) and the recording."""

    frames: int
    skipped: int
    skipped_lines: tuple[int, ...]
    root: Path


def _open_text(path: Path) -> Iterator[str | None]:
    """The lines of a (gzipped) UTF-8 file; None stands for a line too long to keep, which is read past."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as fh:
            while line := fh.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    while (rest := fh.readline(MAX_LINE + 1)) and not rest.endswith("\n"):
                        pass
                    yield None
                else:
                    yield line
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as (gzipped) UTF-8 text: {exc}") from None


def _plausible(ns: int) -> bool:
    return STAMP_RANGE_NS[0] <= ns < STAMP_RANGE_NS[1]


def _seconds_to_ns(text: str) -> int:
    whole, _, frac = text.partition(".")
    if not _DIGITS.fullmatch(whole) or (frac and not _DIGITS.fullmatch(frac)):
        raise ValueError(text)
    return int(whole) * 10**9 + int((frac + "000000000")[:9])


def iter_hftbacktest(path: str | Path, skipped: list[int] | None = None) -> Iterator[Record]:
    """Records of an hftbacktest capture; lines without a plausible ns stamp are skipped and their numbers collected."""
    for lineno, line in enumerate(_open_text(Path(path)), 1):
        stamp, sep, frame = (line or "").rstrip("\n").partition(" ")
        ns = int(stamp) if _DIGITS.fullmatch(stamp) and len(stamp) <= 19 else -1
        if not sep or not _plausible(ns) or not frame:
            if skipped is not None:
                skipped.append(lineno)
            continue
        yield Record(ns, ns, 0, frame)


def iter_cryptofeed(path: str | Path, skipped: list[int] | None = None) -> Iterator[Record]:
    """Records of a cryptofeed raw websocket file (the header line is not a frame)."""
    for lineno, line in enumerate(_open_text(Path(path)), 1):
        if line is not None and lineno == 1 and " <-> " in line:
            continue
        if line is not None and not line.strip():
            continue
        stamp, sep, frame = (line or "").rstrip("\n").partition(": ")
        try:
            ns = _seconds_to_ns(stamp) if len(stamp) <= 40 else -1
        except ValueError:
            ns = -1
        if not sep or not _plausible(ns) or not frame:
            if skipped is not None:
                skipped.append(lineno)
            continue
        yield Record(ns, ns, 0, frame)


def import_capture(path: str | Path, out: str | Path, *, kind: str = "hftbacktest") -> ImportReport:
    """Write the capture at `path` as a recording under `out` (an empty or new directory), marked complete at the end.

    Bad lines are skipped and counted in the report; a file that cannot be read raises `DataError` and leaves `out`
    unfinished (refused by every reader).
    """
    readers = {"hftbacktest": iter_hftbacktest, "cryptofeed": iter_cryptofeed}
    if kind not in readers:
        raise DataError(f"capture kind {kind!r} is unknown; use one of {sorted(readers)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"capture {str(path)!r} does not exist")
    skipped: list[int] = []
    n = 0
    rec = Recorder(out, meta={"imported_from": path.name, "kind": kind})
    try:
        with rec:
            for r in readers[kind](path, skipped):
                rec.write(r)
                n += 1
    except DataError as exc:
        raise DataError(f"{exc}; {out} is left unfinished (readers refuse it): remove it before importing again") \
            from None
    return ImportReport(n, len(skipped), tuple(skipped[:20]), Path(out))
