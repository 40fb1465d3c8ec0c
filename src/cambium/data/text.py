"""Reading text corpora as documents: plain text, blank-line paragraphs, JSONL, or an HF `datasets` dataset on disk."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Literal

from cambium.core.errors import DataError

TextFormat = Literal["text", "paragraphs", "jsonl", "hf"]


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def read_documents(path: Path, fmt: TextFormat, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a corpus.

    text: the whole file is one document. paragraphs: documents separated by blank lines. jsonl: one JSON object per
    line, the document in `text_field`. hf: a dataset saved with `datasets.save_to_disk` (a directory), column
    `text_field` of its train split (or of the dataset itself); a path that does not exist locally is taken as a
    hub dataset name (`owner/name`), which needs network access.
    """
    if fmt == "hf":
        yield from _read_hf(path, text_field)
        return
    if not path.exists():
        raise DataError(f"dataset path {str(path)!r} does not exist")
    if not path.is_file():
        raise DataError(f"dataset path {str(path)!r} is a directory; format {fmt!r} reads one file")
    try:
        with _open(path) as fh:
            if fmt == "text":
                yield fh.read()
            elif fmt == "paragraphs":
                yield from _paragraphs(fh)
            elif fmt == "jsonl":
                yield from _jsonl(fh, path, text_field)
            else:
                raise DataError(f"unknown text format {fmt!r}; use text, paragraphs, jsonl or hf")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def _paragraphs(fh: IO[str]) -> Iterator[str]:
    lines: list[str] = []
    for line in fh:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)


def _jsonl(fh: IO[str], path: Path, field: str) -> Iterator[str]:
    for number, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{number}: no string field {field!r} in this record")
        yield record[field]


def _read_hf(path: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("format 'hf' needs the `datasets` package: pip install 'cambium[hf]'") from None
    if path.exists():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk ({exc})") from None
    else:
        try:
            ds = datasets.load_dataset(str(path), split="train")
        except Exception as exc:  # the hub client raises many kinds (offline, missing, gated)
            raise DataError(f"{str(path)!r} is not a local dataset directory and could not be loaded from the "
                            f"hub ({type(exc).__name__}: {exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset dict has no 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {ds.column_names})")
    for value in ds[field]:
        yield str(value)
