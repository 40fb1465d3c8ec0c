"""OT-CFM: the coupling against torchcfm's OT plan, OT cost below random pairing, sampler orders on a closed-form flow,
and the sampler (analytic and trained velocity) recovering a known 2-D Gaussian mixture."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchcfm.optimal_transport import OTPlanSampler

from cambium.core.errors import ConfigError
from cambium.worldmodel.flow import (
    VelocityNet,
    cfm_loss,
    integrate,
    ot_couple,
    ot_plan,
    pair_cost,
    sample_conditional,
)


def _batch(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g,
                                                                           dtype=torch.float64) * 2 + 1


def test_exact_plan_equals_torchcfm() -> None:
    x0, x1 = _batch(64, 8, 0)
    ours = ot_plan(x0, x1)
    ref = OTPlanSampler(method="exact").get_map(x0, x1)
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    # Two uniform batches of one size: the exact plan is a permutation (each row one entry 1/B).
    assert ((ours > 0).sum(1) == 1).all() and np.allclose(ours.sum(1), 1 / 64)


def test_sinkhorn_plan_equals_torchcfm_above_the_exact_limit() -> None:
    x0, x1 = _batch(96, 4, 1)
    ours = ot_plan(x0, x1, exact_max_batch=32, sinkhorn_reg=0.05)
    ref = OTPlanSampler(method="sinkhorn", reg=0.05, normalize_cost=True).get_map(x0, x1)
    np.testing.assert_allclose(ours, ref, atol=1e-7)
    np.testing.assert_allclose(ours.sum(0), 1 / 96, atol=1e-7)


@pytest.mark.parametrize("exact_max", [256, 16])
def test_ot_pairs_cost_less_than_random_and_context_moves_with_its_target(exact_max: int) -> None:
    x0, x1 = _batch(128, 6, 2)
    cond = torch.arange(128, dtype=torch.float64)[:, None] * torch.ones(1, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a, b, c = ot_couple(x0, x1, cond, g, exact_max_batch=exact_max)
    assert torch.equal(a, x0)
    j = c[:, 0].long()
    assert torch.equal(b, x1[j]) and torch.equal(c, cond[j])  # the context row travels with its target
    ot_cost = float(((a - b) ** 2).sum(1).mean())
    random_cost = float(((x0 - x1) ** 2).sum(1).mean())
    assert ot_cost < 0.8 * random_cost, (ot_cost, random_cost)
    if exact_max >= 128:
        assert sorted(j.tolist()) == list(range(128))  # exact: a permutation
        # and it is the minimum over permutations: no swap of two pairs lowers the cost.
        cost = pair_cost(x0, x1)
        i = torch.arange(128)
        gain = cost[i, j][:, None] + cost[i, j][None, :] - cost[i[:, None], j[None, :]] - cost[i[None, :], j[:, None]]
        assert float(gain.max()) <= 1e-9


def _gaussian_flow_error(method: str, steps: int) -> float:
    """The straight-line flow to N(mu, s² I) from N(0, I) (independent pairs) maps x0 to mu + s·x0 exactly."""
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.3

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None]
        var = (1 - t) ** 2 + t**2 * s**2
        return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)

    x0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return float((integrate(v, x0, steps, method) - (mu + s * x0)).abs().max())  # type: ignore[arg-type]


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_sampler_converges_at_its_order(method: str, order: int) -> None:
    e1, e2 = _gaussian_flow_error(method, 16), _gaussian_flow_error(method, 32)
    assert e2 < e1
    # At least the method's order (midpoint happens to gain one on this linear flow); Euler is first order.
    assert math.log2(e1 / e2) > order - 0.35
    assert method != "euler" or math.log2(e1 / e2) < 1.35


def test_sampler_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="steps=0"):
        integrate(lambda x, t: x, torch.zeros(1, 2), 0)
    with pytest.raises(ConfigError, match="sampler='heun'"):
        integrate(lambda x, t: x, torch.zeros(1, 2), 2, "heun")  # type: ignore[arg-type]


MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
STD = 0.3


def _mixture(n: int, g: torch.Generator, shift: torch.Tensor | None = None) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    x = MEANS[k] + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x if shift is None else x + shift


def _mixture_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x1 − x0 | x_t = x] for x0 ~ N(0, I) independent of x1 ~ the mixture (closed form per component)."""
    t = t[:, None, None]
    var = (1 - t) ** 2 + t**2 * STD**2  # [B, 1, 1]
    diff = x[:, None, :] - t * MEANS[None]  # [B, K, 2]
    logw = torch.log(WEIGHTS)[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - torch.log(var[..., 0])
    w = torch.softmax(logw, dim=1)[..., None]
    u = MEANS[None] + (t * STD**2 - (1 - t)) / var * diff
    return (w * u).sum(1)


def _energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def test_sampler_with_the_exact_velocity_recovers_the_mixture() -> None:
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    x1 = integrate(_mixture_velocity, x0, 32, "rk4")
    ref, ref2 = _mixture(4000, g), _mixture(4000, g)
    assert _energy_distance(x1, ref) < 3 * _energy_distance(ref2, ref) + 1e-3
    k = torch.cdist(x1, MEANS).argmin(1)
    np.testing.assert_allclose(torch.bincount(k, minlength=3).double().numpy() / 4000, WEIGHTS.numpy(), atol=0.025)
    for c in range(3):
        np.testing.assert_allclose(x1[k == c].mean(0).numpy(), MEANS[c].numpy(), atol=0.05)
        np.testing.assert_allclose(x1[k == c].std(0).numpy(), [STD, STD], atol=0.05)


def _train_conditional(cond_weight: float) -> tuple[VelocityNet, torch.Generator]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    net = VelocityNet(2, 1, hidden=64, n_layers=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(400):
        c = torch.randint(0, 2, (128, 1), generator=g).float() * 2 - 1  # context -1 or +1 shifts the mixture
        x1 = (_mixture(128, g) + c.double() * SHIFT).float()
        loss = cfm_loss(net, x1, c, g, cond_weight=cond_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net, g


SHIFT = torch.tensor([4.0, 0.0], dtype=torch.float64)


@pytest.mark.slow
def test_trained_conditional_flow_recovers_the_mixture_per_context() -> None:
    torch.set_num_threads(1)
    net, g = _train_conditional(cond_weight=100.0)
    plain, _ = _train_conditional(cond_weight=0.0)
    for sign in (-1.0, 1.0):
        cond = torch.full((1, 1), sign)
        x = sample_conditional(net, cond, 3000, 16, "midpoint", g)[0].double()
        k = torch.cdist(x, MEANS + sign * SHIFT).argmin(1)
        np.testing.assert_allclose(torch.bincount(k, minlength=3).double().numpy() / 3000, WEIGHTS.numpy(),
                                   atol=0.06)
        ref, wrong = _mixture(3000, g) + sign * SHIFT, _mixture(3000, g) - sign * SHIFT
        assert _energy_distance(x, ref) < 0.1 < _energy_distance(x, wrong)
        # The coupling on x alone hands each context the noise nearest its targets: sampled from N(0, I), it is off.
        y = sample_conditional(plain, cond, 3000, 16, "midpoint", g)[0].double()
        assert _energy_distance(y, ref) > 2 * _energy_distance(x, ref)
