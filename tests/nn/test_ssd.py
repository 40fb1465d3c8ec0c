import pytest
import torch
import torch.nn.functional as F

from cambium.nn.ssd import ssd_chunked, ssd_sequential

# (b, l, h, p, g, n, chunk): lengths that are, are not, and are shorter than a multiple of the chunk; grouped B/C.
SHAPES = [
    (1, 16, 1, 4, 1, 3, 4),
    (2, 37, 4, 8, 2, 5, 8),
    (2, 64, 4, 8, 1, 16, 16),
    (1, 5, 2, 3, 2, 4, 8),
    (3, 33, 6, 4, 3, 8, 1),
]


def make_inputs(b, l, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype) - 1.0)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 4 - 0.05
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype) / n**0.5
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype) / n**0.5
    s0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return [t.requires_grad_(True) for t in (x, dt, A, B, C, s0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_sequential_outputs_and_gradients(shape, with_state, dtype):
    b, l, h, p, g, n, q = shape
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    ins = make_inputs(b, l, h, p, g, n, dtype)
    ref_ins = [t.detach().clone().requires_grad_(True) for t in ins]
    x, dt, A, B, C, s0 = ins
    y, final = ssd_chunked(x, dt, A, B, C, chunk_size=q, initial_state=s0 if with_state else None)
    rx, rdt, rA, rB, rC, rs0 = ref_ins
    y_ref, final_ref = ssd_sequential(rx, rdt, rA, rB, rC, initial_state=rs0 if with_state else None)
    assert y.dtype == dtype and y.shape == (b, l, h, p) and final.shape == (b, h, p, n)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(final, final_ref, atol=tol, rtol=tol)

    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=dtype)
    ((y * wy).sum() + (final * wf).sum()).backward()
    ((y_ref * wy).sum() + (final_ref * wf).sum()).backward()
    names = ["x", "dt", "A", "B", "C", "initial_state"]
    for name, a, r in zip(names, ins, ref_ins, strict=True):
        if name == "initial_state" and not with_state:
            continue
        assert a.grad is not None and r.grad is not None, name
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad, r.grad, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")


def test_final_state_carries_over_a_split_sequence():
    x, dt, A, B, C, _ = (t.detach() for t in make_inputs(2, 50, 4, 8, 1, 6, torch.float32))
    y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk_size=8)
    y1, s1 = ssd_chunked(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], chunk_size=8)
    y2, s2 = ssd_chunked(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], chunk_size=8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, s_full, atol=1e-5, rtol=1e-5)


def test_long_sequence_with_strong_decay_stays_finite_and_exact():
    # Prefix sums of dt·A reach ~ -5e3 here; the state decays must still be exact.
    x, dt, A, B, C, _ = (t.detach() for t in make_inputs(1, 1024, 2, 4, 1, 4, torch.float32, seed=3))
    dt = dt * 8
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=64)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_accumulate_in_fp32():
    x, dt, A, B, C, _ = (t.detach() for t in make_inputs(2, 256, 4, 8, 1, 8, torch.float32, seed=5))
    y_ref, _ = ssd_sequential(x, dt, A, B, C)
    y, s = ssd_chunked(*(t.bfloat16() for t in (x, dt, A, B, C)), chunk_size=32)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    # Only the bf16 rounding of the inputs and of y remains (~3 significant digits).
    assert (y.float() - y_ref).abs().max() < 0.05 * y_ref.abs().max()
    assert torch.isfinite(s).all()


def test_bad_shapes_are_rejected():
    x, dt, A, B, C, s0 = (t.detach() for t in make_inputs(1, 8, 4, 2, 2, 3, torch.float32))
    with pytest.raises(ValueError, match="dt"):
        ssd_chunked(x, dt[:, :4], A, B, C)
    with pytest.raises(ValueError, match="multiple"):
        ssd_chunked(x, dt, A, B[:, :, :1].expand(1, 8, 3, 3), C[:, :, :1].expand(1, 8, 3, 3))
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, initial_state=s0[..., :2])
