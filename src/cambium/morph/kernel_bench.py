"""Urabrask, blueprint evaluation: measure a compiled kernel (latency, parameters, memory) and tag it.

Latency is the median of `repeats` timed forwards (after one warm-up) on a random input of the kernel's shape with
batch `batch` (and T = 16 for token layouts). Memory is parameters + buffers plus every intermediate value of that
forward (from IR shape inference). Tags, one of each class:
- speed: "fast" (< 0.1 ms) / "medium" (< 1 ms) / "slow";
- size: "small" (< 10k params) / "medium_size" (< 100k) / "large";
- memory (state + activation bytes of the benchmark forward): "low_memory" (< 1 MiB) / "medium_memory" (< 16 MiB) /
  "high_memory";
- risk: "risk_high" if the kernel keeps running statistics (batch norm: its output depends on the batch in training
  and on the running estimates in evaluation, so a graft can behave differently at validation than it trained),
  else "risk_low".
Tamiyo's blueprint choice reads them (`policy.avoid_tags`, `policy.prefer_tags`).
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from cambium.morph.contracts import BlueprintIR
from cambium.morph.ir import activation_elements

__all__ = ["TAG_CLASSES", "Benchmark", "benchmark", "is_stateful", "tags_for"]

TAG_CLASSES: dict[str, tuple[str, ...]] = {
    "speed": ("fast", "medium", "slow"),
    "size": ("small", "medium_size", "large"),
    "memory": ("low_memory", "medium_memory", "high_memory"),
    "risk": ("risk_low", "risk_high"),
}
"""Every tag Urabrask gives, by class (a config naming another tag is refused)."""

TOKENS = 16


class Benchmark:
    def __init__(self, latency_ms: float, param_count: int, state_bytes: int, activation_bytes: int,
                 stateful: bool = False) -> None:
        self.latency_ms = latency_ms
        self.param_count = param_count
        self.state_bytes = state_bytes
        self.activation_bytes = activation_bytes
        self.tags = tags_for(latency_ms, param_count, state_bytes + activation_bytes, stateful)


def is_stateful(module: nn.Module) -> bool:
    """True if the module keeps running statistics (its forward differs between training and evaluation)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def tags_for(latency_ms: float, param_count: int, memory_bytes: int = 0, stateful: bool = False) -> tuple[str, ...]:
    speed = "fast" if latency_ms < 0.1 else "medium" if latency_ms < 1.0 else "slow"
    size = "small" if param_count < 10_000 else "medium_size" if param_count < 100_000 else "large"
    memory = "low_memory" if memory_bytes < 2**20 else "medium_memory" if memory_bytes < 16 * 2**20 else "high_memory"
    return speed, size, memory, "risk_high" if stateful else "risk_low"


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
    return Benchmark(statistics.median(times), params, state, act, is_stateful(module))
