"""`memory_forward`: runs a memory rule on its configured execution path, the reference or a fast one.

The paths (recurrent references in `rules.py`, exact chunkwise delta rule in `delta_kernel.py`, chunk-start-gradient
approximation in `chunk_approx.py`) never import this module, so the imports point one way: dispatch → paths.
Shapes as in `rules.py`: q, k `[B, H, T, Dk]`, v `[B, H, T, Dv]`, gates `[B, H, T]`.
"""

from __future__ import annotations

import torch

from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.delta_kernel import delta_rule_chunkwise
from cambium.nn.memory.rules import MemoryState, miras_recurrent, trellis_recurrent

__all__ = ["memory_forward"]


def memory_forward(
    cfg: MemoryConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: torch.Tensor | None = None,
    eta: torch.Tensor | None = None,
    initial: MemoryState | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """Run `cfg` on its configured execution path (recurrent, chunkwise_exact, chunkwise_approx)."""
    if cfg.rule == "trellis":
        return trellis_recurrent(cfg, q, k, v, theta, alpha, initial)
    if cfg.execution == "recurrent":
        return miras_recurrent(cfg, q, k, v, theta, alpha, eta, initial)
    if cfg.execution == "chunkwise_exact":
        w0 = None if initial is None else initial.params[0]
        o, w = delta_rule_chunkwise(q, k, v, theta, alpha, w0, chunk_size=cfg.chunk_size)
        return o, MemoryState((w,), ())
    # Imported on use, not at the top: the package imports this module, and `python -m cambium.nn.memory.chunk_approx`
    # (the error table) would otherwise find chunk_approx already imported and run it twice (runpy's RuntimeWarning).
    from cambium.nn.memory.chunk_approx import chunk_approx_forward

    return chunk_approx_forward(cfg, q, k, v, theta, alpha, eta, initial)
