"""SDPA attention (MHA, GQA, sliding window) and MLA against explicit-softmax references, outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from cambium.core.errors import ConfigError
from cambium.nn.attention import MLA, Attention, attention_reference, causal_mask, mla_reference
from cambium.nn.rope import apply_rope_reference


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad(out, inputs, g))


def test_causal_mask_window() -> None:
    m = causal_mask(5, 2)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    assert torch.equal(causal_mask(4, None), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    ("n_heads", "n_kv_heads", "window", "dtype"),
    [(4, 4, None, torch.float32), (4, 2, None, torch.float32), (6, 2, 3, torch.float32), (4, 1, 1, torch.float64)],
)
def test_attention_matches_naive(n_heads: int, n_kv_heads: int, window: int | None, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    attn = Attention(32, n_heads, n_kv_heads, head_dim=8, window=window, max_seq_len=16, rope_theta=100.0).to(dtype)
    x = torch.randn(2, 9, 32, dtype=dtype, requires_grad=True)
    out = attn(x)

    b, t, _ = x.shape
    q = (x @ attn.wq.weight.T).view(b, t, n_heads, 8)
    k, v = (x @ attn.wkv.weight.T).view(b, t, 2, n_kv_heads, 8).unbind(2)
    q, k = apply_rope_reference(q, 100.0), apply_rope_reference(k, 100.0)
    ref = attention_reference(q, k, v, window).flatten(2) @ attn.wo.weight.T

    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    torch.testing.assert_close(out, ref, **tol)
    params = [x, attn.wq.weight, attn.wkv.weight, attn.wo.weight]
    for a, r in zip(_grads(out, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(a, r, **tol)


def test_attention_is_causal_and_windowed() -> None:
    torch.manual_seed(1)
    attn = Attention(16, 2, window=3, max_seq_len=16)
    x = torch.randn(1, 10, 16)
    base = attn(x)
    x2 = x.clone()
    x2[0, 6] += 1.0  # position 6 may influence only positions 6, 7, 8 (window 3)
    diff = (attn(x2) - base).abs().sum(-1)[0]
    assert torch.all(diff[:6] == 0) and torch.all(diff[9:] == 0)
    assert torch.all(diff[6:9] > 0)


def test_attention_rejects_bad_shapes() -> None:
    with pytest.raises(ConfigError, match="n_kv_heads=3"):
        Attention(32, 4, 3)
    with pytest.raises(ConfigError, match="window=0"):
        Attention(32, 4, window=0)


@pytest.mark.parametrize(
    ("q_lora_rank", "window", "v_dim", "dtype"),
    [
        (None, None, 6, torch.float32),
        (12, None, 12, torch.float32),  # value as wide as query/key: no padding
        (None, None, 16, torch.float32),  # value wider than query/key
        (12, 4, 6, torch.float64),
        (None, 2, 6, torch.float64),
    ],
)
def test_mla_matches_naive(q_lora_rank: int | None, window: int | None, v_dim: int, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    mla = MLA(
        24, 3, kv_lora_rank=10, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=v_dim,
        q_lora_rank=q_lora_rank, window=window, max_seq_len=16, rope_theta=50.0,
    ).to(dtype)
    with torch.no_grad():  # non-trivial norm weights so the reference must apply them
        mla.kv_norm.weight.uniform_(0.5, 1.5)
        if mla.q_norm is not None:
            mla.q_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 24, dtype=dtype, requires_grad=True)
    out, ref = mla(x), mla_reference(mla, x, 50.0)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    torch.testing.assert_close(out, ref, **tol)
    params = [x, *mla.parameters()]
    for a, r in zip(_grads(out, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(a, r, **tol)


def test_mla_is_causal() -> None:
    torch.manual_seed(3)
    mla = MLA(16, 2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, max_seq_len=8)
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[0, 4] -= 2.0
    diff = (mla(x2) - mla(x)).abs().sum(-1)[0]
    assert torch.all(diff[:4] == 0) and torch.all(diff[4:] > 0)
