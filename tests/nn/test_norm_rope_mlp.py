"""RMSNorm, RoPE and SwiGLU against their written-out formulas (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from cambium.core.errors import ConfigError
from cambium.nn.mlp import SwiGLU, swiglu_reference
from cambium.nn.norm import RMSNorm, rms_norm_reference
from cambium.nn.rope import RotaryEmbedding, apply_rope_reference


@pytest.mark.parametrize("shape", [(3, 8), (2, 5, 16)])
def test_rmsnorm_matches_formula_and_grads(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape, requires_grad=True)
    out = norm(x)
    ref = rms_norm_reference(x, norm.weight, 1e-5)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, norm.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, norm.weight), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    # Unit RMS after normalisation with unit weight.
    plain = RMSNorm(shape[-1], eps=0.0)(x)
    torch.testing.assert_close(plain.pow(2).mean(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)


def test_rmsnorm_keeps_dtype() -> None:
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert RMSNorm(8)(x).dtype == torch.bfloat16


@pytest.mark.parametrize("head_dim", [4, 16])
def test_rope_matches_complex_rotation(head_dim: int) -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(head_dim, max_seq_len=32, theta=500.0)
    x = torch.randn(2, 7, 3, head_dim, dtype=torch.float64)
    torch.testing.assert_close(rope(x.float()).double(), apply_rope_reference(x, 500.0), atol=1e-5, rtol=1e-5)


def test_rope_preserves_norm_and_relative_positions() -> None:
    torch.manual_seed(2)
    rope = RotaryEmbedding(8, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    # Rotations keep norms; the q·k score depends only on the position difference.
    torch.testing.assert_close(rope(q, offset=5).norm(), q.norm())
    s1 = (rope(q, offset=10) * rope(k, offset=7)).sum()
    s2 = (rope(q, offset=40) * rope(k, offset=37)).sum()
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="max_seq_len=64"):
        rope(torch.randn(1, 10, 1, 8), offset=60)
    with pytest.raises(ConfigError, match="head_dim=7"):
        RotaryEmbedding(7, 8)


def test_swiglu_matches_unfused_reference() -> None:
    torch.manual_seed(3)
    mlp = SwiGLU(12, 20)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w1, w3 = mlp.w13.weight[:20], mlp.w13.weight[20:]
    out, ref = mlp(x), swiglu_reference(x, w1, w3, mlp.w2.weight)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, mlp.w13.weight, mlp.w2.weight), g)
    want = torch.autograd.grad(ref, (x, mlp.w13.weight, mlp.w2.weight), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
