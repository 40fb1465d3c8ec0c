"""CMS-aware data parallelism (NES-9) on torch.distributed, without a DDP wrapper.

Each of the W ranks takes its B / W lanes of every chunk (the stream is read alike on every rank), runs forward and
backward on them, and then:

- `reduce_gradients` all-reduces (mean) only the gradients that the optimiser will apply this step: every parameter
  outside the CMS levels, and the levels that fire. A frozen level's gradient has already gone into its local fp32
  buffer (`OuterGradients.gate` sets `.grad = None`), so it is not sent; on its firing step the level's gradient is
  its local buffered sum plus that step's gradient, and the mean of those sums over ranks is the sum of the global
  means (the mean is linear), so W ranks apply what one process of the global batch would.
- `gather_lanes` all-gathers the per-lane context memory (and carried attention inputs), so every rank holds the
  whole `[B, ...]` state and rank 0's checkpoint is complete (a resume may run with any number of ranks).

The gradients travel as one flat fp32 buffer per step (one collective), in parameter order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as torch_dist

from cambium.core.distributed import DistInfo, all_reduce_mean
from cambium.core.errors import ConfigError
from cambium.nn.memory import MemoryState

__all__ = ["CmsSync"]


class CmsSync:
    """Gradient and context-memory exchange of one rank among `info.world_size`."""

    def __init__(self, info: DistInfo, lanes: int) -> None:
        if lanes % info.world_size:
            raise ConfigError(f"context.batch_size={lanes} must divide by the number of ranks ({info.world_size}) "
                              "for CMS-aware data parallelism")
        per = lanes // info.world_size
        self.info, self.rows = info, slice(info.rank * per, (info.rank + 1) * per)
        self.sent_elements = 0  # gradient elements all-reduced so far (what skipping frozen levels saves shows here)

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Mean over ranks of every `.grad` that is not None (the frozen levels' are None)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        flat /= self.info.world_size
        self.sent_elements += flat.numel()
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def mean(self, value: torch.Tensor) -> float:
        """A scalar averaged over ranks (the loss of the global batch, from equal shards)."""
        return float(all_reduce_mean(value.detach().float()))

    def gather_lanes(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's lanes `[B / W, ...]` → every rank's, `[B, ...]` in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.info.world_size)]
        torch_dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    def gather_states(self, states: Sequence[Sequence[MemoryState | None] | None]
                      ) -> list[list[MemoryState | None] | None]:
        return [None if block is None else
                [None if s is None else MemoryState(tuple(self.gather_lanes(p) for p in s.params),
                                                    tuple(self.gather_lanes(o) for o in s.opt)) for s in block]
                for block in states]
