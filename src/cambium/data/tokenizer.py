"""Tokenizers: o200k_base / o200k_harmony through tiktoken from a local ranks file, or a byte-level BPE trained offline.

tiktoken looks for its ranks in `TIKTOKEN_CACHE_DIR` under `sha1(download URL)`; `tiktoken_from_file` lays the
committed `o200k_base.tiktoken` out that way (tiktoken checks its sha256) so nothing is downloaded. o200k_harmony is
o200k_base's ranks plus the harmony special tokens (vocab 201,088).

`train_bpe` is the offline default: a byte-level BPE trained with HF `tokenizers` on the corpus itself. Its JSON is
saved next to the shards so that a run can always decode what it trained on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from cambium.core.errors import DataError

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
TIKTOKEN_NAMES = ("o200k_base", "o200k_harmony")
BPE_SPECIALS = ("<|endoftext|>",)


class Tokenizer(Protocol):
    """What the data pipeline needs of a tokenizer."""

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class TiktokenTokenizer:
    def __init__(self, encoding: object, name: str, ranks_sha256: str) -> None:
        self._enc = encoding
        self._name = name
        self._fingerprint = hashlib.sha256(f"tiktoken:{name}:{ranks_sha256}".encode()).hexdigest()

    @property
    def name(self) -> str:
        return self._name

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)  # type: ignore[attr-defined]

    @property
    def eot_id(self) -> int:
        return int(self._enc.eot_token)  # type: ignore[attr-defined]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        # Special-token text inside a corpus is encoded as ordinary text, never as a control token.
        return list(self._enc.encode_ordinary(text))  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._enc.decode(list(ids)))  # type: ignore[attr-defined]


class BPETokenizer:
    def __init__(self, tokenizer: object, json_text: str) -> None:
        self._tok = tokenizer
        self._json = json_text
        self._fingerprint = hashlib.sha256(json_text.encode()).hexdigest()
        eot = tokenizer.token_to_id(BPE_SPECIALS[0])  # type: ignore[attr-defined]
        if eot is None:
            raise DataError(f"BPE tokenizer has no {BPE_SPECIALS[0]} token; retrain it with cambium")
        self._eot = int(eot)

    @property
    def name(self) -> str:
        return "bpe"

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())  # type: ignore[attr-defined]

    @property
    def eot_id(self) -> int:
        return self._eot

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._tok.decode(list(ids)))  # type: ignore[attr-defined]

    def save(self, path: Path) -> None:
        path.write_text(self._json, encoding="utf-8")


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def tiktoken_from_file(name: str, ranks_file: Path, cache_dir: Path) -> TiktokenTokenizer:
    """Load tiktoken's `name` (o200k_base or o200k_harmony) from a local o200k ranks file, offline."""
    if name not in TIKTOKEN_NAMES:
        raise DataError(f"tiktoken encoding {name!r} is not supported offline; use one of {TIKTOKEN_NAMES}")
    if not ranks_file.is_file():
        raise DataError(f"tokenizer ranks file {str(ranks_file)!r} does not exist (committed copy: "
                        "data/samples/tokenizers/o200k_base.tiktoken)")
    sha = hashlib.sha256(ranks_file.read_bytes()).hexdigest()
    if sha != O200K_SHA256:
        raise DataError(f"{ranks_file}: sha256 {sha} is not o200k_base's {O200K_SHA256}")
    import tiktoken

    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / hashlib.sha1(O200K_URL.encode()).hexdigest()
    if not target.exists():
        shutil.copyfile(ranks_file, target)
    # tiktoken reads the cache location from the environment only; set it for this call alone.
    with _env("TIKTOKEN_CACHE_DIR", str(cache_dir)):
        encoding = tiktoken.get_encoding(name)
    return TiktokenTokenizer(encoding, name, sha)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE (HF `tokenizers`) with `<|endoftext|>` as its only special token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + len(BPE_SPECIALS):
        raise DataError(f"bpe vocab_size={vocab_size} must be at least {257 + len(BPE_SPECIALS)} "
                        "(256 bytes + specials)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok, tok.to_str())


def load_bpe(path: Path) -> BPETokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    if not path.is_file():
        raise DataError(f"BPE tokenizer file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        tok = HFTokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a plain Exception on malformed JSON
        raise DataError(f"{path}: not a tokenizers JSON file: {exc}") from None
    return BPETokenizer(tok, text)
