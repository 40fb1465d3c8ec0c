"""WM-5 Multiverse Crossing: perturbations on the sphere, the three features on hand-built futures and flows, config
fuzz."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from cambium.core.config import load_data
from cambium.core.errors import ConfigError, DataError
from cambium.worldmodel.flow import VelocityNet
from cambium.worldmodel.multiverse import (
    MultiverseConfig,
    bifurcation_index,
    convergence_score,
    lyapunov_proxy,
    multiverse_features,
    perturb_on_sphere,
)

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _geodesic(a: Tensor, b: Tensor) -> Tensor:
    """Great-circle angle between rows (atan2 form: accurate near 0 and π)."""
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    cos = (ua * ub).sum(-1)
    sin = (ub - cos[..., None] * ua).norm(dim=-1)
    return torch.atan2(sin, cos)


def _rotation(p: int, seed: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@FAST
@given(d=st.integers(2, 24), t=st.integers(1, 4), angle=st.floats(0.0, math.pi), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_perturbations_stay_on_the_sphere_at_the_angle(d: int, t: int, angle: float, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen, dtype=torch.float64) * scale
    moved = perturb_on_sphere(x, angle, 5, gen)
    assert moved.shape == (t, 5, d)
    torch.testing.assert_close(moved.norm(dim=-1), x.norm(dim=-1, keepdim=True).expand(t, 5), rtol=1e-12, atol=0)
    torch.testing.assert_close(_geodesic(x[:, None].expand_as(moved), moved), torch.full((t, 5), angle,
                               dtype=torch.float64), rtol=0, atol=1e-7)


def test_a_zero_latent_and_a_zero_angle_are_left_as_they_are() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], dtype=torch.float64)
    moved = perturb_on_sphere(x, 0.3, 4, gen)
    assert torch.equal(moved[0], torch.zeros(4, 3, dtype=torch.float64))
    assert torch.equal(perturb_on_sphere(x, 0.0, 4, gen), x[:, None].expand(2, 4, 3))


def test_perturbation_directions_are_spread_over_the_tangent_space() -> None:
    """Isotropic tangent noise: the mean direction of many copies points back to x (no preferred tangent axis)."""
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    moved = perturb_on_sphere(x, 0.5, 20000, torch.Generator().manual_seed(1))[0]
    tangent = moved[:, 1:] / (3.0 * math.sin(0.5))
    assert tangent.mean(0).abs().max() < 0.03
    torch.testing.assert_close(tangent.pow(2).mean(0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02,
                               rtol=0)


def test_bifurcation_is_zero_for_rank_one_and_one_for_isotropic_futures() -> None:
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(6, generator=gen, dtype=torch.float64)
    line = 3.0 + torch.randn(2, 40, 1, generator=gen, dtype=torch.float64) * direction  # two branches on a line too
    line[1, :20] += 5 * direction
    assert bifurcation_index(line).abs().max() < 1e-9
    eye = torch.eye(6, dtype=torch.float64)
    iso = torch.cat([eye, -eye])[None] @ _rotation(6, 1)  # ±e_i, rotated: every direction spread alike
    torch.testing.assert_close(bifurcation_index(iso), torch.ones(1, dtype=torch.float64), atol=1e-9, rtol=0)
    many = torch.randn(1, 4000, 3, generator=gen, dtype=torch.float64)  # isotropic Gaussian cloud
    assert float(bifurcation_index(many)) > 0.999
    assert float(bifurcation_index(torch.ones(1, 10, 3))) == 0.0  # no spread at all


@FAST
@given(k=st.integers(3, 24), p=st.integers(2, 10), scale=st.floats(1e-3, 1e3), shift=st.floats(-1e3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_bifurcation_is_invariant_to_scale_shift_rotation_and_order(k: int, p: int, scale: float, shift: float,
                                                                     seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(2, k, p, generator=gen, dtype=torch.float64) * torch.rand(p, generator=gen, dtype=torch.float64)
    base = bifurcation_index(y)
    assert ((base >= 0) & (base <= 1)).all()
    moved = (y @ _rotation(p, seed + 1)) * scale + shift
    moved = moved[:, torch.randperm(k, generator=gen)]
    torch.testing.assert_close(bifurcation_index(moved), base, atol=1e-7, rtol=0)


@FAST
@given(w=st.integers(2, 5), n=st.integers(2, 6), p=st.integers(1, 6), scale=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2**31 - 1))
def test_convergence_is_in_range_and_invariant(w: int, n: int, p: int, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(3, w, n, p, generator=gen, dtype=torch.float64)
    y = y + torch.randn(3, w, 1, p, generator=gen, dtype=torch.float64) * torch.rand(3, 1, 1, 1, generator=gen,
                                                                                      dtype=torch.float64) * 3
    base = convergence_score(y)
    assert ((base >= 0) & (base <= 1)).all()
    moved = (y @ _rotation(p, seed + 1)) * scale - 7.0
    moved = moved[:, torch.randperm(w, generator=gen)][:, :, torch.randperm(n, generator=gen)]
    torch.testing.assert_close(convergence_score(moved), base, atol=1e-9, rtol=0)


def test_convergence_is_one_for_identical_worlds_and_falls_as_they_part() -> None:
    gen = torch.Generator().manual_seed(0)
    one = torch.randn(1, 1, 16, 4, generator=gen, dtype=torch.float64)
    assert float(convergence_score(one.expand(1, 5, 16, 4))) == 1.0
    assert float(convergence_score(torch.zeros(1, 3, 4, 2))) == 1.0  # no spread at all
    offsets = torch.randn(1, 5, 1, 4, generator=gen, dtype=torch.float64)
    scores = [float(convergence_score(one + s * offsets)) for s in (0.1, 1.0, 10.0)]
    assert scores[0] > scores[1] > scores[2] and scores[2] < 0.05


@FAST
@given(a=st.floats(0.1, 8.0), patches=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_lyapunov_of_futures_that_scale_the_perturbation_is_log_a(a: float, patches: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    d, m, n = 4, 3, 5
    x = torch.randn(2, d, generator=gen, dtype=torch.float64)
    worlds = torch.cat([x[:, None], perturb_on_sphere(x, 0.2, m, gen)], dim=1)  # [2, W, D]
    delta0 = (worlds[:, 1:] - worlds[:, :1]).pow(2).sum(-1).mean(1).sqrt()
    noise = torch.randn(2, 1, n, patches, d, generator=gen, dtype=torch.float64)
    growth = a ** torch.arange(1, patches + 1, dtype=torch.float64)
    fut = noise + growth[None, None, None, :, None] * worlds[:, :, None, None, :]
    torch.testing.assert_close(lyapunov_proxy(fut, delta0), torch.full((2,), math.log(a), dtype=torch.float64),
                               atol=1e-9, rtol=0)
    assert torch.equal(lyapunov_proxy(fut, torch.zeros(2, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64))


class _ScalingFlow(nn.Module):
    """A hand-built 'velocity net': v = concat_f a^f·cond[:D] for every t, so the future is noise + that (exact under
    any ODE solver)."""

    def __init__(self, d: int, patches: int, a: float) -> None:
        super().__init__()
        self.d, self.patches, self.a = d, patches, a
        self.dim = d * patches

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return torch.cat([self.a ** (f + 1) * cond[:, : self.d] for f in range(self.patches)], dim=-1)


@pytest.mark.parametrize("sampler", ["euler", "rk4"])
def test_features_through_a_known_flow(sampler: str) -> None:
    d, patches, a = 6, 3, 1.7
    ctx = torch.randn(10, d + 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = MultiverseConfig(copies=4, futures=5, angle=0.1, sampler=sampler, ode_steps=3, batch_origins=4)
    flow = _ScalingFlow(d, patches, a)
    feats = multiverse_features(flow, ctx, cfg, generator=torch.Generator().manual_seed(1), latent_dims=d)
    assert len(feats) == 10 and feats.stack().shape == (10, 3) and feats.stack().dtype == np.float32
    np.testing.assert_allclose(feats.lyapunov, math.log(a), atol=1e-5)
    assert ((feats.convergence > 0) & (feats.convergence < 1)).all()
    assert ((feats.bifurcation >= 0) & (feats.bifurcation <= 1)).all()
    still = multiverse_features(flow, ctx, cfg.model_copy(update={"angle": 0.0}),
                                generator=torch.Generator().manual_seed(1), latent_dims=d)
    np.testing.assert_array_equal(still.convergence, 1.0)
    np.testing.assert_array_equal(still.lyapunov, 0.0)
    # The worlds' futures share their noise: with the noise switched off they differ by the perturbation alone
    wide = multiverse_features(flow, ctx, cfg.model_copy(update={"angle": 1.0}),
                               generator=torch.Generator().manual_seed(1), latent_dims=d)
    assert (wide.convergence < feats.convergence).all()


def _sensitive_net(seed: int) -> VelocityNet:
    torch.manual_seed(seed)
    net = VelocityNet(2 * 8, 10, hidden=32, n_layers=2)
    with torch.no_grad():
        for block in net.blocks:
            nn.init.normal_(block.fc2.weight, std=0.3)  # zero at init: the context would not matter yet
            nn.init.normal_(block.film.weight, std=0.5)
    return net


def test_angle_zero_gives_convergence_one_on_a_velocity_net() -> None:
    net = _sensitive_net(0)
    ctx = torch.randn(7, 10, generator=torch.Generator().manual_seed(2))
    cfg = MultiverseConfig(copies=3, futures=4, angle=0.0, ode_steps=2, batch_origins=3)
    feats = multiverse_features(net, ctx, cfg, generator=torch.Generator().manual_seed(0), latent_dims=8)
    np.testing.assert_allclose(feats.convergence, 1.0, atol=1e-6)
    np.testing.assert_array_equal(feats.lyapunov, 0.0)
    means = [multiverse_features(net, ctx, cfg.model_copy(update={"angle": angle}),
                                 generator=torch.Generator().manual_seed(0), latent_dims=8).convergence.mean()
             for angle in (0.1, 0.5, 1.5)]
    assert 1.0 > means[0] > means[1] > means[2]
    assert net.training  # the caller's mode is restored


def test_batching_does_not_change_the_features() -> None:
    """Origins batched by 7 give the features of origins sampled one at a time (the same draws per origin)."""
    net = _sensitive_net(1)
    ctx = torch.randn(9, 10, generator=torch.Generator().manual_seed(3))
    cfg = MultiverseConfig(copies=3, futures=4, angle=0.3, ode_steps=2, batch_origins=7)
    batched = multiverse_features(net, ctx, cfg, generator=torch.Generator().manual_seed(0), latent_dims=8)
    single = multiverse_features(net, ctx, cfg.model_copy(update={"batch_origins": 1}),
                                 generator=torch.Generator().manual_seed(0), latent_dims=8)
    np.testing.assert_allclose(batched.stack(), single.stack(), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_refused_with_one_line() -> None:
    net = _sensitive_net(0)
    cfg = MultiverseConfig(copies=2, futures=2)
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match="latent_dims=3"):
        multiverse_features(net, torch.zeros(2, 10), cfg, generator=gen, latent_dims=3)
    with pytest.raises(ConfigError, match=r"\[T, C\]"):
        multiverse_features(net, torch.zeros(10), cfg, generator=gen, latent_dims=8)
    bad = torch.zeros(3, 10)
    bad[1, 4] = float("nan")
    with pytest.raises(DataError, match="1 of 3 context rows"):
        multiverse_features(net, bad, cfg, generator=gen, latent_dims=8)


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3))


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from([*MultiverseConfig.model_fields, "unknown"]), value=_VALUES)
def test_config_fuzz_gives_one_line_errors(key: str, value: object) -> None:
    try:
        cfg = load_data({key: value}, MultiverseConfig)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert isinstance(cfg, MultiverseConfig)
