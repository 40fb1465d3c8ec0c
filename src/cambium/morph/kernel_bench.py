"""Urabrask, blueprint evaluation: measure a compiled kernel (latency, parameters, memory) and tag it.

Latency is the median of `repeats` timed forwards (after one warm-up) on a random input of the kernel's shape with
batch `batch` (and T = 16 for token layouts). Memory is parameters + buffers plus every intermediate value of that
forward (from IR shape inference). Tags: "fast" (< 0.1 ms) / "medium" (< 1 ms) / "slow"; "small" (< 10k params) /
"medium_size" (< 100k) / "large".
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from cambium.morph.contracts import BlueprintIR
from cambium.morph.ir import activation_elements

__all__ = ["Benchmark", "benchmark", "tags_for"]

TOKENS = 16


class Benchmark:
    def __init__(self, latency_ms: float, param_count: int, state_bytes: int, activation_bytes: int) -> None:
        self.latency_ms = latency_ms
        self.param_count = param_count
        self.state_bytes = state_bytes
        self.activation_bytes = activation_bytes
        self.tags = tags_for(latency_ms, param_count)


def tags_for(latency_ms: float, param_count: int) -> tuple[str, ...]:
    speed = "fast" if latency_ms < 0.1 else "medium" if latency_ms < 1.0 else "slow"
    size = "small" if param_count < 10_000 else "medium_size" if param_count < 100_000 else "large"
    return speed, size


def example_input(ir: BlueprintIR, batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = [batch if d == "B" else TOKENS if d == "T" else int(d) for d in ir.input_shape]
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def benchmark(module: nn.Module, ir: BlueprintIR, batch: int = 8, repeats: int = 5) -> Benchmark:
    x = example_input(ir, batch, next(iter(module.parameters()), torch.empty(0)).dtype)
    was_training = module.training
    module.eval()
    module(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        module(x)
        times.append((time.perf_counter() - t0) * 1e3)
    module.train(was_training)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    state = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    act = activation_elements(ir, batch, TOKENS) * x.element_size()
    return Benchmark(statistics.median(times), params, state, act)
