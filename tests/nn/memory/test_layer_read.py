"""`MemoryLayer.read`: every token reads the same memory and nothing is written (o_t = W q_t for a matrix memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cambium.nn.memory import MemoryConfig, MemoryLayer


def test_read_is_the_memory_applied_to_each_query_and_writes_nothing() -> None:
    torch.manual_seed(0)
    for execution in ("recurrent", "chunkwise_exact"):
        layer = MemoryLayer(16, 2, MemoryConfig(execution=execution, chunk_size=4))
        x = torch.randn(3, 10, 16)
        _, state = layer(torch.randn(3, 7, 16))  # some written memory, [B, H, Dv, Dk]
        q = F.normalize(layer.qkv(x).view(3, 10, 3, 2, 8)[:, :, 0].float(), dim=-1)  # [B, T, H, E]
        o = torch.einsum("bhvk,bthk->bthv", state.params[0], q)
        expected = layer.out(o.reshape(3, 10, 16))
        torch.testing.assert_close(layer.read(x, state), expected, rtol=1e-5, atol=1e-5)
        # with no state it reads the learned initial memory
        w0 = layer.initial_memory(3).params[0]
        expected0 = layer.out(torch.einsum("bhvk,bthk->bthv", w0, q).reshape(3, 10, 16))
        torch.testing.assert_close(layer.read(x), expected0, rtol=1e-5, atol=1e-5)
