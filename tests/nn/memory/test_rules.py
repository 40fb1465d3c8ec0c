"""MIRAS knobs, the named presets and their recurrences, and the chunk-start-gradient approximation."""

from __future__ import annotations

import pytest
import torch

from cambium.core.config import load_data
from cambium.core.errors import ConfigError
from cambium.nn.memory import knobs
from cambium.nn.memory.chunk_approx import chunk_approx_forward, error_table
from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.delta import delta_rule_recurrent
from cambium.nn.memory.dispatch import memory_forward
from cambium.nn.memory.linear_memory import linear_memory_recurrent
from cambium.nn.memory.presets import PRESETS, delta, hebbian, lattice_osr, memora, titans_lmm, trellis
from cambium.nn.memory.rules import MemoryState, initial_state, miras_recurrent

from .memory_inputs import make_inputs

TOL = 1e-5


def _run(cfg: MemoryConfig, x: dict[str, torch.Tensor], **kw: object) -> tuple[torch.Tensor, MemoryState]:
    b, h, _, dk = x["k"].shape
    start = initial_state(cfg, b, h, dk, x["v"].shape[-1], generator=torch.Generator().manual_seed(3))
    return memory_forward(cfg, x["q"], x["k"], x["v"], x["theta"], x["alpha"], x["eta"], start, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_and_keeps_fp32_state_under_autocast(name: str) -> None:
    cfg = PRESETS[name]()
    x = make_inputs(2, 2, 12, 8, 8)
    o, _ = _run(cfg, x)
    assert o.shape == (2, 2, 12, 8) and torch.isfinite(o).all()
    low = {n: t.to(torch.bfloat16) for n, t in x.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_low, state_low = _run(cfg, low)
    o_hi, _ = _run(cfg, {n: t.float() for n, t in low.items()})
    assert all(p.dtype == torch.float32 for p in state_low.params)
    torch.testing.assert_close(o_low.float(), o_hi, atol=2e-2, rtol=2e-2)
    assert PRESETS[name].__doc__ and "=" in PRESETS[name].__doc__  # the update equation is in the docstring


def test_delta_preset_equals_the_delta_reference_and_its_exact_chunkwise_path() -> None:
    x = make_inputs(2, 2, 21, 8, 6)
    start = MemoryState((x["state"],), ())
    o_gen, s_gen = miras_recurrent(delta(), x["q"], x["k"], x["v"], x["theta"], x["alpha"], initial=start)
    o_ref, m_ref = delta_rule_recurrent(x["q"], x["k"], x["v"], x["theta"], x["alpha"], x["state"])
    torch.testing.assert_close(o_gen, o_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_gen.params[0], m_ref, atol=TOL, rtol=TOL)
    cfg = delta(execution="chunkwise_exact", chunk_size=8)
    o_chunk, s_chunk = memory_forward(cfg, x["q"], x["k"], x["v"], x["theta"], x["alpha"], initial=start)
    torch.testing.assert_close(o_chunk, o_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_chunk.params[0], m_ref, atol=TOL, rtol=TOL)


def test_titans_with_matrix_memory_equals_the_linear_memory_reference() -> None:
    x = make_inputs(1, 2, 15, 8, 8)
    cfg = titans_lmm(structure="matrix")
    start = MemoryState((x["state"],), (0.1 * x["state"],))
    o_gen, s_gen = miras_recurrent(cfg, x["q"], x["k"], x["v"], x["theta"], x["alpha"], x["eta"], start)
    o_ref, (m_ref, s_ref) = linear_memory_recurrent(x["q"], x["k"], x["v"], x["theta"], x["alpha"], x["eta"],
                                                    (x["state"], 0.1 * x["state"]))
    torch.testing.assert_close(o_gen, o_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_gen.params[0], m_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_gen.opt[0], s_ref, atol=TOL, rtol=TOL)


def test_hebbian_is_decayed_sum_of_outer_products() -> None:
    x = make_inputs(1, 1, 10, 4, 3)
    _, state = miras_recurrent(hebbian(), x["q"], x["k"], x["v"], x["theta"], x["alpha"])
    expected = torch.zeros(1, 1, 3, 4)
    for t in range(10):
        expected = (1 - x["alpha"][..., t, None, None]) * expected + x["theta"][..., t, None, None] * (
            x["v"][:, :, t, :, None] * x["k"][:, :, t, None, :])
    torch.testing.assert_close(state.params[0], expected, atol=TOL, rtol=TOL)


def test_ftrl_with_l2_retention_equals_gd() -> None:
    """With a quadratic regulariser, FTRL on the decayed gradient sum is the same map as gd with decay."""
    x = make_inputs(2, 1, 14, 6, 6)
    start = MemoryState((x["state"],), ())
    o_gd, s_gd = miras_recurrent(delta(), x["q"], x["k"], x["v"], x["theta"], x["alpha"], initial=start)
    o_ftrl, s_ftrl = miras_recurrent(delta(algorithm="ftrl"), x["q"], x["k"], x["v"], x["theta"], x["alpha"],
                                     initial=start)
    torch.testing.assert_close(o_ftrl, o_gd, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_ftrl.params[0], s_gd.params[0], atol=TOL, rtol=TOL)


def test_retention_invariants() -> None:
    x = make_inputs(2, 2, 16, 8, 8)
    _, s_kl = _run(memora(), x)
    for p in s_kl.params:
        assert (p > 0).all()
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5, rtol=0)
    _, s_sphere = _run(lattice_osr(), x)
    torch.testing.assert_close(s_sphere.params[0].norm(dim=-1), torch.ones(2, 2, 8), atol=1e-5, rtol=0)
    o_lat, _ = _run(lattice_osr(), x)
    torch.testing.assert_close(o_lat.sum(-1), torch.ones(2, 2, 16), atol=1e-5, rtol=0)  # softmax read
    _, s_l2 = _run(delta(), x)
    _, s_en = _run(delta(retention="elastic_net", l1=0.2), x)
    assert (s_en.params[0] == 0).float().mean() > 0.2 > (s_l2.params[0] == 0).float().mean()


def test_sphere_update_is_orthogonal_to_the_slot() -> None:
    cfg = lattice_osr()
    w = torch.nn.functional.normalize(torch.randn(1, 1, 4, 6), dim=-1)
    u = torch.randn(1, 1, 4, 6)
    one = torch.ones(1, 1)
    new = knobs.retain(cfg, w, u, one, one)
    u_perp = u - (u * w).sum(-1, keepdim=True) * w
    torch.testing.assert_close(new, torch.nn.functional.normalize(w + u_perp, dim=-1))


def test_newton_schulz_orthogonalises() -> None:
    m = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(knobs.newton_schulz(m, 5))
    assert sv.min() > 0.5 and sv.max() < 1.3  # the quintic iteration lands singular values near 1, not exactly
    x = make_inputs(1, 2, 10, 6, 6)
    o, _ = _run(delta(algorithm="newton_schulz"), x)
    assert torch.isfinite(o).all()


@pytest.mark.parametrize("name", ["titans_lmm", "moneta", "yaad"])
def test_mlp_parameter_gradients_match_autograd(name: str) -> None:
    cfg = PRESETS[name]()
    params = tuple(p.requires_grad_() for p in knobs.init_params(cfg, 2, 3, 5, 4, torch.Generator().manual_seed(0),
                                                                  torch.float64))
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    v = 3 * torch.randn(2, 3, 4, dtype=torch.float64)
    pred = knobs.predict(cfg, params, x)
    g_out = knobs.bias_grad(cfg, pred, v).detach()
    expected = torch.autograd.grad((pred * g_out).sum(), params)
    for ours, ref in zip(knobs.param_grads(cfg, params, x, g_out), expected, strict=True):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("structure", ["vector", "matrix", "mlp"])
@pytest.mark.parametrize("algorithm", ["gd", "momentum"])
@pytest.mark.parametrize("bias", ["l2", "huber", "lp"])
def test_chunk_approx_with_chunk_one_is_the_recurrence(structure: str, algorithm: str, bias: str) -> None:
    cfg = MemoryConfig(structure=structure, algorithm=algorithm, bias=bias)  # type: ignore[arg-type]
    x = make_inputs(1, 2, 11, 6, 6)
    x["theta"] = 0.3 * x["theta"]
    start = initial_state(cfg, 1, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    if structure != "mlp":
        start = MemoryState(tuple(p + 0.3 for p in start.params), ())
    names = ["q", "k", "v", "theta", "alpha", "eta"]
    a = [x[n].clone().requires_grad_() for n in names]
    b = [x[n].clone().requires_grad_() for n in names]
    o_ref, s_ref = miras_recurrent(cfg, *a, initial=start)
    o_app, s_app = chunk_approx_forward(cfg, *b, initial=start, chunk_size=1)
    torch.testing.assert_close(o_app, o_ref, atol=TOL, rtol=TOL)
    for p, r in zip(s_app.params, s_ref.params, strict=True):
        torch.testing.assert_close(p, r, atol=TOL, rtol=TOL)
    weights = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(5))
    used = [0, 1, 2, 3, 4, 5] if algorithm == "momentum" else [0, 1, 2, 3, 4]
    g_ref = torch.autograd.grad((o_ref * weights).sum(), [a[i] for i in used])
    g_app = torch.autograd.grad((o_app * weights).sum(), [b[i] for i in used])
    for ga, gr in zip(g_app, g_ref, strict=True):
        torch.testing.assert_close(ga, gr, atol=TOL, rtol=TOL)


def test_chunk_approx_is_exact_when_gradients_do_not_depend_on_the_memory() -> None:
    """Hebbian (dot-product bias, linear memory): ∇ = −v kᵀ whatever M, so chunk-start gradients are exact."""
    x = make_inputs(2, 2, 30, 8, 8)
    start = initial_state(hebbian(), 2, 2, 8, 8)
    o_ref, s_ref = miras_recurrent(hebbian(), x["q"], x["k"], x["v"], x["theta"], x["alpha"], initial=start)
    o_app, s_app = chunk_approx_forward(hebbian(), x["q"], x["k"], x["v"], x["theta"], x["alpha"], initial=start,
                                        chunk_size=8)
    torch.testing.assert_close(o_app, o_ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(s_app.params[0], s_ref.params[0], atol=TOL, rtol=TOL)


def test_approximation_error_grows_with_chunk_size() -> None:
    rows = error_table(titans_lmm(), chunk_sizes=(1, 4, 16), thetas=(0.01,), b=1, h=1, t=48, dk=8, dv=8)
    errs = [r["rel_err_outputs"] for r in rows]
    assert errs[0] < 1e-5 < errs[1] < errs[2] < 1.0


def test_trellis_with_zero_learning_rate_keeps_its_state() -> None:
    cfg = trellis(slots=4)
    x = make_inputs(1, 2, 6, 8, 5)
    start = initial_state(cfg, 1, 2, 8, 5, generator=torch.Generator().manual_seed(0))
    start = MemoryState((start.params[0], torch.randn(1, 2, 5, 4)), ())
    o, state = memory_forward(cfg, x["q"], x["k"], x["v"], torch.zeros(1, 2, 6), torch.zeros(1, 2, 6), initial=start)
    torch.testing.assert_close(state.params[0], start.params[0])
    address = torch.softmax(torch.einsum("bhmk,bhtk->bhtm", start.params[0], x["q"]), dim=-1)
    torch.testing.assert_close(o, torch.einsum("bhvm,bhtm->bhtv", start.params[1], address))
    o_learn, _ = _run(cfg, make_inputs(1, 2, 6, 8, 5))
    assert torch.isfinite(o_learn).all()


def test_omega_window_sums_the_recent_gradients_at_the_current_memory() -> None:
    x = make_inputs(1, 2, 9, 6, 6)
    cfg = delta(omega_window=3)
    _, state = miras_recurrent(cfg, x["q"], x["k"], x["v"], x["theta"], x["alpha"],
                               initial=MemoryState((x["state"],), ()))
    m = x["state"]
    for t in range(9):
        grad = sum(((m @ x["k"][:, :, j, :, None]).squeeze(-1) - x["v"][:, :, j]).unsqueeze(-1)
                   * x["k"][:, :, j, None, :] for j in range(max(0, t - 2), t + 1))
        m = (1 - x["alpha"][..., t, None, None]) * m - x["theta"][..., t, None, None] * grad
    torch.testing.assert_close(state.params[0], m, atol=TOL, rtol=TOL)
    with pytest.raises(ConfigError, match="omega_window=3"):
        load_data({"omega_window": 3, "execution": "chunkwise_exact"}, MemoryConfig)
