"""MoE layer: grouped/padded expert compute vs the per-expert loop (outputs and gradients), router semantics,
bias balancing rule, auxiliary losses and balance statistics."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from cambium.core.errors import ConfigError, DeviceError
from cambium.nn.moe import MoE, Router, balance_stats, bias_gamma
from cambium.nn.moe_experts import combine, dispatch, expert_compute, plan_dispatch, resolve_backend

GRID = [
    # tokens (B, T), D, H, E, K, score_func, n_groups, topk_groups, n_shared, route_scale
    ((2, 5), 16, 8, 8, 2, "sigmoid", 1, 1, 1, 2.5),
    ((1, 13), 32, 16, 16, 4, "softmax", 4, 2, 0, 1.0),
    ((3, 4), 8, 12, 6, 6, "sigmoid", 3, 3, 2, 1.0),
    ((1, 3), 16, 4, 12, 3, "sigmoid", 4, 1, 0, 0.5),  # most experts get no token
]


def _layer(case: tuple, backend: str, dtype: torch.dtype = torch.float32) -> MoE:
    (_, d, h, e, k, score, groups, topk_groups, shared, scale) = case
    torch.manual_seed(0)
    m = MoE(
        d, e, k, h, n_shared_experts=shared, score_func=score, route_scale=scale, n_groups=groups,
        topk_groups=topk_groups, seq_aux_coef=0.01, z_loss_coef=0.001, backend=backend,
    ).to(dtype)
    with torch.no_grad():
        m.router.bias.copy_(torch.linspace(-0.1, 0.1, e))
    return m


def _run(m: MoE, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out, aux = m(x)
    loss = (out * g).sum() + aux.loss
    params = [x, *m.parameters()]
    return [out.detach(), aux.load, *torch.autograd.grad(loss, params)]


@pytest.mark.parametrize(
    ("case", "backend", "dtype"),
    [
        *product(GRID, ["padded_bmm", "grouped_mm"], [torch.float32]),
        *product(GRID[:2], ["padded_bmm"], [torch.float64]),
    ],
)
def test_fast_backends_match_per_expert_loop(case: tuple, backend: str, dtype: torch.dtype) -> None:
    (b, t), d = case[0], case[1]
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(1), dtype=dtype)
    g = torch.randn(b, t, d, generator=torch.Generator().manual_seed(2), dtype=dtype)
    fast, ref = _layer(case, backend, dtype), _layer(case, "loop", dtype)
    got, want = _run(fast, x, g), _run(ref, x, g)
    names = ["out", "load", "x", *(n for n, _ in fast.named_parameters())]
    assert "router.weight" in names  # the gate gradient is among the compared tensors
    tol = {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    for name, a, r in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, r, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert got[names.index("router.weight")].abs().sum() > 0


def test_dispatch_combine_round_trip() -> None:
    torch.manual_seed(3)
    x = torch.randn(7, 5)
    indices = torch.randint(0, 4, (7, 3))
    plan = plan_dispatch(indices, 4)
    rows = dispatch(x, plan)
    expert_of_row = indices.reshape(-1)[plan.order]
    assert torch.all(expert_of_row[1:] >= expert_of_row[:-1])  # grouped by expert
    assert torch.equal(plan.counts, torch.bincount(indices.reshape(-1), minlength=4))
    weights = torch.full((7, 3), 1 / 3)
    torch.testing.assert_close(combine(rows, weights, plan), x)


def test_router_renormalises_then_scales_and_bias_only_selects() -> None:
    torch.manual_seed(4)
    r = Router(8, 6, 2, route_scale=2.5)
    x = torch.randn(10, 8)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 5.0]))  # expert 5 always chosen
    out = r(x)
    assert torch.all((out.indices == 5).any(-1))
    torch.testing.assert_close(out.weights.sum(-1), torch.full((10,), 2.5))
    # Weights come from the unbiased scores of the chosen experts.
    raw = torch.sigmoid(x @ r.weight.T).gather(1, out.indices)
    torch.testing.assert_close(out.weights, raw / raw.sum(-1, keepdim=True) * 2.5)
    # Without the bias, the choice is the plain top-2 of the scores.
    with torch.no_grad():
        r.bias.zero_()
    plain = r(x)
    assert torch.equal(plain.indices.sort(-1).values, (x @ r.weight.T).topk(2, -1).indices.sort(-1).values)


def test_group_limited_routing_matches_brute_force() -> None:
    torch.manual_seed(5)
    r = Router(8, 12, 3, n_groups=4, topk_groups=2)
    x = torch.randn(20, 8)
    out = r(x)
    scores = torch.sigmoid(x @ r.weight.T)
    for n in range(20):
        group_scores = [sorted(scores[n, g * 3 : g * 3 + 3].tolist())[-2:] for g in range(4)]
        best_groups = sorted(range(4), key=lambda g: -sum(group_scores[g]))[:2]
        allowed = [e for g in best_groups for e in range(g * 3, g * 3 + 3)]
        expect = sorted(allowed, key=lambda e: -scores[n, e].item())[:3]
        assert sorted(out.indices[n].tolist()) == sorted(expect)


def test_router_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ConfigError, match="top_k=9"):
        Router(8, 8, 9)
    with pytest.raises(ConfigError, match="n_groups=3"):
        Router(8, 8, 2, n_groups=3)
    with pytest.raises(ConfigError, match="cannot hold top_k=5"):
        Router(8, 8, 5, n_groups=4, topk_groups=2)


def test_bias_update_follows_sign_rule_centred_and_clamped() -> None:
    m = MoE(8, 4, 1, 8, bias_clamp=0.25)
    load = torch.tensor([10, 0, 5, 1])  # mean 4
    m.update_bias(load, gamma=0.1)
    step = torch.tensor([-0.1, 0.1, -0.1, 0.1])  # sign(mean − load)·γ, already mean 0
    torch.testing.assert_close(m.router.bias, step)
    m.update_bias(torch.tensor([4, 4, 4, 4]), gamma=0.1)  # balanced: no change
    torch.testing.assert_close(m.router.bias, step)
    for _ in range(5):
        m.update_bias(load, gamma=0.1)
    torch.testing.assert_close(m.router.bias, torch.tensor([-0.25, 0.25, -0.25, 0.25]))
    m.update_bias(torch.tensor([0, 0, 0, 8]), gamma=0.1)  # step [.1, .1, .1, -.1] → centred → clamped
    expected = (torch.tensor([-0.15, 0.35, -0.15, 0.15]) - 0.05).clamp(-0.25, 0.25)
    torch.testing.assert_close(m.router.bias, expected)
    assert bias_gamma(10, 100, 1e-3, 0.8) == 1e-3 and bias_gamma(80, 100, 1e-3, 0.8) == 0.0


def test_bias_balancing_evens_out_a_skewed_router() -> None:
    torch.manual_seed(6)
    m = MoE(16, 8, 2, 8)
    with torch.no_grad():
        m.router.weight[0] += 1.0  # expert 0 favoured by a shifted input distribution
    x = torch.randn(2, 32, 16) + 0.5
    before = balance_stats(m(x)[1].load)["max_over_mean"]
    for _ in range(60):
        m.update_bias(m(x)[1].load, gamma=0.03)
    after = balance_stats(m(x)[1].load)["max_over_mean"]
    assert isinstance(before, float) and isinstance(after, float)
    assert before > 2.0 and after < before / 1.5


def test_aux_losses_match_formulas() -> None:
    torch.manual_seed(7)
    b, t, d, e, k = 2, 6, 8, 5, 2
    m = MoE(d, e, k, 4, seq_aux_coef=0.3, z_loss_coef=0.0)
    x = torch.randn(b, t, d)
    _, aux = m(x)
    logits = (x.reshape(-1, d) @ m.router.weight.T).detach()
    scores = torch.sigmoid(logits)
    chosen = scores.topk(k, -1).indices.view(b, t, k)
    expected = 0.0
    for s in range(b):
        p = (scores.view(b, t, e)[s] / scores.view(b, t, e)[s].sum(-1, keepdim=True)).mean(0)
        f = torch.tensor([(chosen[s] == i).sum().item() * e / (k * t) for i in range(e)])
        expected += 0.3 * float((f * p).sum()) / b
    assert aux.loss.item() == pytest.approx(expected, rel=1e-5)
    m.seq_aux_coef, m.z_loss_coef = 0.0, 0.01
    _, aux = m(x)
    assert aux.loss.item() == pytest.approx(0.01 * float(torch.logsumexp(logits, -1).pow(2).mean()), rel=1e-5)


def test_balance_statistics_from_a_forward() -> None:
    e, k = 8, 2
    m = MoE(4, e, k, 4)
    with torch.no_grad():  # zero logits: uniform scores; bias picks experts 3 and 6 for every token
        m.router.weight.zero_()
        m.router.bias[3], m.router.bias[6] = 1.0, 0.5
    _, aux = m(torch.randn(2, 5, 4))
    stats = balance_stats(aux.load, aux.entropy, m.router.bias)
    expected = [0.0] * e
    expected[3] = expected[6] = 0.5
    assert stats["load_fraction"] == pytest.approx(expected)
    assert stats["max_over_mean"] == pytest.approx(e / k)
    assert stats["dead_experts"] == e - k
    assert stats["router_entropy"] == pytest.approx(math.log(e), rel=1e-6)
    assert stats["bias"] == pytest.approx([0, 0, 0, 1.0, 0, 0, 0.5, 0])


def test_backend_resolution_is_explicit() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32, (16, 8)) == "padded_bmm"
    assert resolve_backend("loop", cpu, torch.float32, (16, 8)) == "loop"
    with pytest.raises(DeviceError, match="not multiples of 4"):
        resolve_backend("grouped_mm", cpu, torch.float32, (16, 6))
    with pytest.raises(DeviceError, match="float64"):
        resolve_backend("grouped_mm", cpu, torch.float64, (16, 8))


def test_bf16_autocast_runs_close_to_fp32() -> None:
    case = GRID[0]
    m = _layer(case, "padded_bmm")
    x = torch.randn(2, 5, 16)
    ref, _ = m(x)
    for backend in ("padded_bmm", "grouped_mm"):
        m.backend = backend  # type: ignore[assignment]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = m(x)
        torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
def test_low_precision_experts_stay_close(fmt: str) -> None:
    torch.manual_seed(8)
    ref = MoE(32, 4, 2, 32, backend="padded_bmm")
    q = MoE(32, 4, 2, 32, backend="padded_bmm", lowp=fmt)  # type: ignore[arg-type]
    q.load_state_dict(ref.state_dict())
    x = torch.randn(1, 8, 32, requires_grad=True)
    out_r, out_q = ref(x)[0], q(x)[0]
    rel = float((out_q - out_r).detach().norm() / out_r.detach().norm())
    assert 0 < rel < (0.1 if fmt == "mxfp8" else 0.35)
    out_q.sum().backward()  # straight-through gradients reach the input
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_grouped_mm_accepts_expanded_gradients() -> None:
    torch.manual_seed(9)
    x = torch.randn(10, 16, requires_grad=True)
    counts = torch.tensor([3, 0, 7])
    w13, w2 = torch.randn(3, 16, 8, requires_grad=True), torch.randn(3, 4, 16, requires_grad=True)
    expert_compute(x, counts, w13, w2, "grouped_mm").sum().backward()  # stride-0 gradient from sum()
    got = [t.grad.clone() for t in (x, w13, w2)]  # type: ignore[union-attr]
    for t in (x, w13, w2):
        t.grad = None
    expert_compute(x, counts, w13, w2, "padded_bmm").sum().backward()
    for a, t in zip(got, (x, w13, w2), strict=True):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.parametrize(("groups", "topk_groups"), [(1, 1), (4, 2)])
def test_matches_hf_deepseek_v3_moe(groups: int, topk_groups: int) -> None:
    """Outside reference for routing semantics (sigmoid scores, selection bias, group limits, renormalise then
    scale, shared experts); runs only where transformers is installed (a bench-only dependency)."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    d, e, k, h, shared = 16, 8, 3, 8, 2
    torch.manual_seed(10)
    ours = MoE(d, e, k, h, n_shared_experts=shared, route_scale=2.5, n_groups=groups, topk_groups=topk_groups)
    cfg = DeepseekV3Config(
        hidden_size=d, n_routed_experts=e, num_experts_per_tok=k, n_shared_experts=shared, moe_intermediate_size=h,
        n_group=groups, topk_group=topk_groups, norm_topk_prob=True, routed_scaling_factor=2.5, hidden_act="silu",
    )
    hf = DeepseekV3MoE(cfg)
    with torch.no_grad():
        ours.router.bias.copy_(torch.randn(e) * 0.1)
        hf.gate.weight.copy_(ours.router.weight)
        hf.gate.e_score_correction_bias.copy_(ours.router.bias)
        hf.experts.gate_up_proj.copy_(ours.w13.transpose(1, 2))
        hf.experts.down_proj.copy_(ours.w2.transpose(1, 2))
        assert ours.shared is not None
        hf.shared_experts.gate_proj.weight.copy_(ours.shared.w13.weight[: shared * h])
        hf.shared_experts.up_proj.weight.copy_(ours.shared.w13.weight[shared * h :])
        hf.shared_experts.down_proj.weight.copy_(ours.shared.w2.weight)
    x = torch.randn(2, 9, d)
    torch.testing.assert_close(ours(x)[0], hf(x), atol=1e-5, rtol=1e-5)
