"""Kasmina's kernel cache: compiled kernels by artifact id, least recently used evicted past a byte budget.

The cache holds one prototype module per artifact; seeds get their own deep copy (they train it). An entry's size
is the bytes of its parameters and buffers. A kernel larger than the whole budget is returned but not kept.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

__all__ = ["KernelCache", "module_bytes"]


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class KernelCache:
    def __init__(self, max_bytes: int = 128 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[nn.Module, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __contains__(self, artifact_id: str) -> bool:
        with self._lock:
            return artifact_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, artifact_id: str, load: Callable[[str], nn.Module]) -> nn.Module:
        """A fresh copy of the kernel `artifact_id`, loading it with `load` on a miss."""
        with self._lock:
            entry = self._entries.get(artifact_id)
            if entry is not None:
                self._entries.move_to_end(artifact_id)
                self.hits += 1
                return copy.deepcopy(entry[0])
            self.misses += 1
        module = load(artifact_id)
        size = module_bytes(module)
        with self._lock:
            if size <= self.max_bytes and artifact_id not in self._entries:
                self._entries[artifact_id] = (module, size)
                self.bytes += size
                while self.bytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self.bytes -= evicted
                    self.evictions += 1
        return copy.deepcopy(module)
