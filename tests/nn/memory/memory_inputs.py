"""Shared helpers: random normalised inputs and flash-linear-attention's pure-PyTorch references.

fla's package `__init__` imports triton (not installable on this CPU box), so its `naive.py` files are loaded by path;
they import only torch and einops. Tests using them skip when fla (pip `fla-core`) is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F


def fla_naive(op: str) -> ModuleType:
    """fla.ops.<op>.naive loaded without importing fla's package (skips the test if fla is absent)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention (pip fla-core) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / op / "naive.py"
    if not path.is_file():
        pytest.skip(f"fla has no {path}")
    module_spec = importlib.util.spec_from_file_location(f"_fla_naive_{op}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_inputs(
    b: int, h: int, t: int, dk: int, dv: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """q, k `[B, H, T, Dk]` L2-normalised, v `[B, H, T, Dv]`, gates theta/alpha/eta `[B, H, T]`,
    state `[B, H, Dv, Dk]`."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "q": F.normalize(rnd(b, h, t, dk), dim=-1),
        "k": F.normalize(rnd(b, h, t, dk), dim=-1),
        "v": rnd(b, h, t, dv),
        "theta": torch.sigmoid(rnd(b, h, t)),
        "alpha": 0.2 * torch.sigmoid(rnd(b, h, t)),
        "eta": 0.9 * torch.sigmoid(rnd(b, h, t)),
        "state": 0.5 * rnd(b, h, dv, dk),
    }
