"""Token shards: flat little-endian uint16/uint32 files plus a manifest, written atomically, read by memory map.

Layout of a shard set directory:
    manifest.json        format, tokenizer (name, fingerprint, vocab, eot), dtype, sources (path, sha256), shards
    shard_00000.bin ...  the token stream, documents each followed by the tokenizer's end-of-text id

The manifest carries the sha256 of every shard and of every source file, so equal inputs give byte-identical
manifests (no timestamps) and a corrupted shard is caught by `TokenShards(..., verify=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cambium.core.errors import DataError
from cambium.core.files import file_sha256

FORMAT = "cambium-token-shards/1"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class TokenizerInfo:
    name: str
    fingerprint: str
    vocab_size: int
    eot_id: int


def write_shards(
    out_dir: Path,
    documents: Iterable[Sequence[int]],
    tokenizer: TokenizerInfo,
    *,
    sources: Sequence[Path] = (),
    shard_tokens: int = 1 << 24,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `documents` (token id sequences) as a shard set at `out_dir`; return the manifest.

    The set is assembled in a temporary sibling directory and renamed into place, so a crash leaves either the old set
    or the new one, never a mix.
    """
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    dtype_name = dtype_for_vocab(tokenizer.vocab_size)
    dtype = DTYPES[dtype_name]
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, Any]] = []
    buffer: list[np.ndarray] = []
    buffered = 0
    n_docs = 0

    def flush(final: bool) -> None:
        nonlocal buffer, buffered
        while buffered >= shard_tokens or (final and buffered):
            flat = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            take = min(shard_tokens, flat.size)
            path = tmp / f"shard_{len(shards):05d}.bin"
            flat[:take].astype("<" + np.dtype(dtype).str[1:], copy=False).tofile(path)
            shards.append({"file": path.name, "tokens": int(take), "sha256": file_sha256(path)})
            rest = flat[take:]
            buffer, buffered = ([rest] if rest.size else []), int(rest.size)

    for doc in documents:
        ids = np.asarray(doc, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise DataError(f"token ids outside [0, {tokenizer.vocab_size}) in document {n_docs}")
        buffer.append(np.append(ids, tokenizer.eot_id).astype(dtype))
        buffered += ids.size + 1
        n_docs += 1
        flush(final=False)
    flush(final=True)
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer.__dict__,
        "dtype": dtype_name,
        "documents": n_docs,
        "total_tokens": sum(s["tokens"] for s in shards),
        "sources": [{"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sources],
        "shards": shards,
        **(extra or {}),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return manifest


class TokenShards:
    """A read-only view of a shard set as one token stream ([N] integers), memory-mapped."""

    def __init__(self, path: Path, *, verify: bool = False) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{self.path} is not a token shard set (no manifest.json); run `cambium moe prep-mixture`")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest_path}: malformed JSON: {exc}") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: format {self.manifest.get('format')!r} is not {FORMAT!r}")
        dtype = DTYPES[self.manifest["dtype"]]
        self._maps: list[np.ndarray] = []
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise DataError(f"{file}: shard listed in the manifest is missing")
            if file.stat().st_size != shard["tokens"] * np.dtype(dtype).itemsize:
                raise DataError(f"{file}: size {file.stat().st_size} B does not match {shard['tokens']} tokens")
            if verify and file_sha256(file) != shard["sha256"]:
                raise DataError(f"{file}: sha256 does not match the manifest (corrupted shard)")
            self._maps.append(np.memmap(file, dtype=np.dtype(dtype).newbyteorder("<"), mode="r"))
        self._starts = np.cumsum([0] + [m.size for m in self._maps])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def tokenizer(self) -> TokenizerInfo:
        return TokenizerInfo(**self.manifest["tokenizer"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64 ([length])."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset = start - int(self._starts[shard])
        while filled < length:
            piece = self._maps[shard][offset : offset + length - filled]
            out[filled : filled + piece.size] = piece
            filled += piece.size
            shard, offset = shard + 1, 0
        return out
