"""Exact chunkwise delta rule (WY form) and the linear-memory kernel pair against the token-by-token recurrence,
fla's pure-PyTorch references, gradcheck, and the fp32 inner loop under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from cambium.core.errors import ConfigError
from cambium.nn.memory.delta import delta_rule_recurrent
from cambium.nn.memory.delta_kernel import DeltaChunkFunction, delta_rule_chunkwise
from cambium.nn.memory.linear_memory import LinearMemoryFunction, linear_memory_fused, linear_memory_recurrent

from .memory_inputs import fla_naive, make_inputs

TOL = 1e-5


def _grads(out: tuple[torch.Tensor, torch.Tensor], inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    loss = sum((x * torch.randn(x.shape, generator=gen)).sum() for x in out)
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("backend", ["kernel", "autograd"])
@pytest.mark.parametrize(
    ("b", "h", "t", "dk", "dv", "chunk", "gated"),
    [
        (1, 1, 16, 8, 8, 4, False),
        (2, 3, 37, 8, 6, 8, True),
        (1, 2, 64, 16, 16, 64, True),
        (2, 1, 50, 4, 12, 16, False),
        (1, 1, 9, 8, 4, 1, True),
    ],
)
def test_chunkwise_equals_recurrence(backend: str, b: int, h: int, t: int, dk: int, dv: int, chunk: int,
                                     gated: bool) -> None:
    x = make_inputs(b, h, t, dk, dv)
    names = ["q", "k", "v", "theta", "alpha", "state"]
    ref_in = [x[n].clone().requires_grad_() for n in names]
    fast_in = [x[n].clone().requires_grad_() for n in names]

    def call(fn, a, **kw):  # type: ignore[no-untyped-def]
        q, k, v, th, al, s0 = a
        return fn(q, k, v, th, al if gated else None, initial_state=s0, **kw)

    o_ref, s_ref = call(delta_rule_recurrent, ref_in)
    o_fast, s_fast = call(delta_rule_chunkwise, fast_in, chunk_size=chunk, backend=backend)
    torch.testing.assert_close(o_fast, o_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_fast, s_ref, atol=TOL, rtol=TOL)
    used = [0, 1, 2, 3, 4, 5] if gated else [0, 1, 2, 3, 5]
    g_ref = _grads((o_ref, s_ref), [ref_in[i] for i in used])
    g_fast = _grads((o_fast, s_fast), [fast_in[i] for i in used])
    for name, a, e in zip([names[i] for i in used], g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, e, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def test_full_forgetting_gate_is_finite() -> None:
    x = make_inputs(1, 2, 20, 8, 8)
    alpha = x["alpha"].clone()
    alpha[..., 5] = 1.0
    o_ref, s_ref = delta_rule_recurrent(x["q"], x["k"], x["v"], x["theta"], alpha)
    leaf = alpha.clone().requires_grad_()
    o_fast, s_fast = delta_rule_chunkwise(x["q"], x["k"], x["v"], x["theta"], leaf, chunk_size=8)
    torch.testing.assert_close(o_fast, o_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_fast, s_ref, atol=TOL, rtol=TOL)
    (grad,) = torch.autograd.grad(o_fast.sum() + s_fast.sum(), leaf)
    assert torch.isfinite(grad).all()


def test_matches_fla_delta_rule_reference() -> None:
    """Outputs, final state and gradients equal fla's `delta_rule_recurrence` (fla: S = Mᵀ, q scaled by Dk^-0.5)."""
    naive = fla_naive("delta_rule")
    x = make_inputs(2, 2, 64, 16, 8)
    scale = 16**-0.5
    names = ["q", "k", "v", "theta"]
    fla_in = [x[n].clone().requires_grad_() for n in names]
    ours_in = [x[n].clone().requires_grad_() for n in names]
    o_fla, s_fla = naive.delta_rule_recurrence(*fla_in)
    o_fla_chunk, _ = naive.delta_rule_chunkwise(*(t.detach() for t in fla_in), chunk_size=16)
    q, k, v, th = ours_in
    o, s = delta_rule_chunkwise(q * scale, k, v, th, chunk_size=16)
    torch.testing.assert_close(o, o_fla, atol=TOL, rtol=TOL)
    torch.testing.assert_close(o, o_fla_chunk, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s, s_fla.mT, atol=TOL, rtol=TOL)
    g_ours = _grads((o, s), ours_in)
    g_fla = _grads((o_fla, s_fla.mT), fla_in)
    for name, a, e in zip(names, g_ours, g_fla, strict=True):
        torch.testing.assert_close(a, e, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def test_matches_fla_gated_delta_rule_reference() -> None:
    """fla's gated rule decays before taking the error; ours with θ = β·γ, v = v'/γ is the same map."""
    naive = fla_naive("gated_delta_rule")
    x = make_inputs(1, 3, 40, 8, 8)
    gamma = 1.0 - x["alpha"]
    o_fla, s_fla = naive.naive_recurrent_gated_delta_rule(
        *(t.transpose(1, 2) for t in (x["q"], x["k"], x["v"], x["theta"], gamma.log())),
        scale=1.0, output_final_state=True,
    )
    o, s = delta_rule_chunkwise(x["q"], x["k"], x["v"] / gamma[..., None], x["theta"] * gamma, x["alpha"],
                                chunk_size=16)
    torch.testing.assert_close(o, o_fla.transpose(1, 2), atol=TOL, rtol=TOL)
    torch.testing.assert_close(s, s_fla.mT, atol=TOL, rtol=TOL)


def test_delta_kernel_gradcheck() -> None:
    x = make_inputs(1, 1, 7, 4, 3, dtype=torch.float64)
    lg = torch.log1p(-x["alpha"])
    args = [x["q"], x["k"], x["v"], x["theta"], lg, x["state"]]
    args = [a.clone().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: DeltaChunkFunction.apply(*a, 3), args)


def test_linear_memory_kernel_gradcheck() -> None:
    x = make_inputs(1, 2, 9, 4, 3, dtype=torch.float64)
    args = [x["q"], x["k"], x["v"], x["theta"], 1.0 - x["alpha"], x["eta"], x["state"], 0.3 * x["state"].flip(-1)]
    args = [a.clone().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: LinearMemoryFunction.apply(*a, 4), args)


@pytest.mark.parametrize(("t", "segment"), [(17, 4), (8, 64), (12, 1)])
def test_linear_memory_kernel_equals_recurrence(t: int, segment: int) -> None:
    x = make_inputs(2, 2, t, 8, 6)
    names = ["q", "k", "v", "theta", "alpha", "eta"]
    ref_in = [x[n].clone().requires_grad_() for n in names]
    fast_in = [x[n].clone().requires_grad_() for n in names]
    init = (x["state"], 0.1 * x["state"])
    o_ref, (m_ref, s_ref) = linear_memory_recurrent(*ref_in, initial_state=init)
    o_fast, (m_fast, s_fast) = linear_memory_fused(*fast_in, initial_state=init, segment=segment)
    for a, e in zip((o_fast, m_fast, s_fast), (o_ref, m_ref, s_ref), strict=True):
        torch.testing.assert_close(a, e, atol=TOL, rtol=TOL)
    for a, e in zip(_grads((o_fast, m_fast, s_fast), fast_in), _grads((o_ref, m_ref, s_ref), ref_in), strict=True):
        torch.testing.assert_close(a, e, atol=TOL, rtol=TOL)


def test_momentum_free_linear_memory_is_the_delta_rule() -> None:
    x = make_inputs(1, 2, 15, 8, 8)
    o_lin, (m_lin, _) = linear_memory_fused(x["q"], x["k"], x["v"], x["theta"], x["alpha"])
    o_delta, m_delta = delta_rule_chunkwise(x["q"], x["k"], x["v"], x["theta"], x["alpha"], chunk_size=4)
    torch.testing.assert_close(o_lin, o_delta, atol=TOL, rtol=TOL)
    torch.testing.assert_close(m_lin, m_delta, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("fn", ["delta", "linear"])
def test_inner_loop_stays_fp32_under_bf16_autocast(fn: str) -> None:
    x = make_inputs(1, 2, 24, 8, 8)
    low = {n: t.to(torch.bfloat16) for n, t in x.items()}
    if fn == "delta":
        def run(d):  # type: ignore[no-untyped-def]
            return delta_rule_chunkwise(d["q"], d["k"], d["v"], d["theta"], d["alpha"], chunk_size=8)
    else:
        def run(d):  # type: ignore[no-untyped-def]
            o, (m, _) = linear_memory_fused(d["q"], d["k"], d["v"], d["theta"], d["alpha"], d["eta"])
            return o, m
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_low, state_low = run(low)
    o_hi, state_hi = run({n: t.float() for n, t in low.items()})
    assert state_low.dtype == torch.float32
    assert o_low.dtype == torch.bfloat16
    torch.testing.assert_close(state_low, state_hi, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o_low.float(), o_hi, atol=1e-2, rtol=1e-2)


def test_bad_shapes_are_rejected() -> None:
    x = make_inputs(1, 2, 8, 4, 4)
    with pytest.raises(ConfigError, match=r"gate of shape \(1, 2, 7\)"):
        delta_rule_chunkwise(x["q"], x["k"], x["v"], x["theta"][..., :7])
    with pytest.raises(ConfigError, match="chunk_size=0"):
        delta_rule_chunkwise(x["q"], x["k"], x["v"], x["theta"], chunk_size=0)
    with pytest.raises(ConfigError, match=r"values \(1, 2, 7, 4\)"):
        delta_rule_recurrent(x["q"], x["k"], x["v"][:, :, :7], x["theta"])
