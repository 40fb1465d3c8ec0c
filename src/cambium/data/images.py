"""CIFAR-10 from its python-pickle batches, read with an unpickler that admits only numpy arrays and plain values.

The batches are pickles; a pickle can run arbitrary code, so `_SafeUnpickler` refuses every global except the three
numpy constructors a CIFAR batch needs. A pickle can also be small and expand: a list of many references to one array
is a few bytes per reference and becomes a full copy each in `np.asarray`. So `b'data'` must already be a uint8 array
`[N, 3072]` whose bytes came from the file (N * 3072 <= file size), labels are N plain integers, and files are capped
in size before they are read.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cambium.core.errors import DataError

CIFAR10_DIR = Path("data/samples/images/cifar10/cifar-10-batches-py")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


_MAX_BATCH_BYTES = 256 << 20  # a real batch is 31 MB (10,000 images)
_MAX_META_BYTES = 1 << 20  # a real batches.meta is 158 bytes
_MAX_CLASSES = 1000


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path, what: str, max_bytes: int) -> Any:
    if not path.is_file():
        raise DataError(f"CIFAR-10 {what} {str(path)!r} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path}: {size:,} bytes is more than a CIFAR-10 {what} holds (at most {max_bytes:,})")
    try:
        with path.open("rb") as fh:
            return _SafeUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # an untrusted file: whatever the unpickler trips on is a bad file, in one line
        raise DataError(f"{path}: not a CIFAR-10 python {what} ({type(exc).__name__}: {exc})") from None


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`data [N, 3072]` uint8 and `labels [N]` int64 of one batch file, checked before anything is copied."""
    batch = _unpickle(path, "batch", _MAX_BATCH_BYTES)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: b'data' must be a uint8 array [N, 3072], got {type(data).__name__} {shape}")
    if data.nbytes > path.stat().st_size:
        raise DataError(f"{path}: b'data' holds {data.nbytes:,} bytes, more than the file: not a CIFAR-10 batch")
    n = data.shape[0]
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and labels.shape[0] == n and np.issubdtype(labels.dtype, np.integer)
    else:
        ok = isinstance(labels, list) and len(labels) == n and all(type(v) is int for v in labels)
    if not ok:
        raise DataError(f"{path}: b'labels' must be {n} integers, one per image")
    return data, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class ImageSet:
    """Images `[N, 3, 32, 32]` uint8 and labels `[N]` int64, with the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_cifar10(root: Path = CIFAR10_DIR, batches: Sequence[str] = ("data_batch_1",),
                 limit: int | None = None) -> ImageSet:
    """Concatenate the named batches (e.g. data_batch_1..5 or test_batch) of a cifar-10-batches-py directory."""
    meta = _load_batch_meta(root / "batches.meta")
    xs, ys = [], []
    for name in batches:
        data, labels = _load_batch(root / name)
        if labels.size and (labels.min() < 0 or labels.max() >= len(meta)):
            raise DataError(f"{root / name}: labels outside [0, {len(meta)})")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    images, targets = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    if limit is not None:
        images, targets = images[:limit], targets[:limit]
    return ImageSet(images, targets, meta)


def _load_batch_meta(path: Path) -> tuple[str, ...]:
    meta = _unpickle(path, "metadata", _MAX_META_BYTES)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if (not isinstance(names, list) or not 0 < len(names) <= _MAX_CLASSES
            or not all(isinstance(n, bytes) and len(n) <= 256 for n in names)):
        raise DataError(f"{path}: CIFAR-10 metadata is a dict whose b'label_names' lists 1-{_MAX_CLASSES} byte "
                        "strings")
    try:
        return tuple(n.decode() for n in names)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: a class name is not UTF-8 ({exc})") from None


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, 3, H, W]` → float32 standardised by the CIFAR-10 channel statistics."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, `[N, C, H, W]`, drawn from `generator` (reproducible)."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
    index = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[index, channels, rows, cols]
