import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import ConfigError
from cambium.nn.mamba2 import Mamba2Block, Mamba2Mixer, bounded_dt_shift

KW = dict(d_state=8, n_heads=4, expand=2, d_conv=4, chunk_size=8)


def make_block(clock_dim=3, seed=0, **kw):
    torch.manual_seed(seed)
    block = Mamba2Block(16, clock_dim=clock_dim, **{**KW, **kw})
    if clock_dim:
        # The clock projection starts at zero (neutral); give it weights so that the tests exercise it.
        torch.nn.init.normal_(block.mixer.clock_proj.weight, std=1.0)
    return block


@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("length", [5, 19])
def test_chunked_block_matches_the_sequential_scan(length, n_groups):
    block = make_block(n_groups=n_groups)
    ref = make_block(n_groups=n_groups, scan="sequential")
    ref.load_state_dict(block.state_dict())
    u = torch.randn(2, length, 16, requires_grad=True)
    clock = torch.randn(2, length, 3)
    u_ref = u.detach().clone().requires_grad_(True)
    y, s = block(u, clock)
    y_ref, s_ref = ref(u_ref, clock)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.ssm, s_ref.ssm, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, atol=1e-5, rtol=1e-5)
    for (name, p), p_ref in zip(block.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_pieces_with_carried_state_equal_the_whole_sequence():
    block = make_block()
    u, clock = torch.randn(2, 30, 16), torch.randn(2, 30, 3)
    y_full, s_full = block(u, clock)
    y1, s1 = block(u[:, :11], clock[:, :11])
    y2, s2 = block(u[:, 11:12], clock[:, 11:12], s1)  # a single step, as when streaming
    y3, s3 = block(u[:, 12:], clock[:, 12:], s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], dim=1), y_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s3.ssm, s_full.ssm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s3.conv, s_full.conv)


def test_block_is_causal():
    block = make_block()
    u, clock = torch.randn(1, 24, 16), torch.randn(1, 24, 3)
    y, _ = block(u, clock)
    u2, clock2 = u.clone(), clock.clone()
    u2[:, 15:] += torch.randn(1, 9, 16)
    clock2[:, 15:] += 10.0
    y2, _ = block(u2, clock2)
    torch.testing.assert_close(y2[:, :15], y[:, :15])
    assert not torch.allclose(y2[:, 15:], y[:, 15:])


@settings(max_examples=200, deadline=None)
@given(raw=st.floats(allow_nan=False, allow_infinity=True, width=32), delta=st.floats(0.0, 10.0))
def test_dt_shift_is_bounded_for_any_raw_value(raw, delta):
    out = bounded_dt_shift(torch.tensor([raw], dtype=torch.float32), delta)
    assert torch.isfinite(out).all()
    # The shift is computed in float32, so the bound is the float32 value of delta (a subnormal delta rounds up).
    bound = torch.tensor(delta, dtype=torch.float32).item()
    assert out.abs().item() <= bound * (1 + 1e-6)


@settings(max_examples=50, deadline=None)
@given(
    scale=st.floats(1e-3, 1e30),
    seed=st.integers(0, 2**31 - 1),
)
def test_mixer_step_size_stays_within_the_clock_bound(scale, seed):
    mixer = Mamba2Mixer(16, clock_dim=3, dt_max_delta=2.0, **KW)
    gen = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(mixer.clock_proj.weight, std=1.0, generator=gen)
    dt_raw = torch.randn(2, 7, 4, generator=gen)
    clock = torch.randn(2, 7, 3, generator=gen) * scale
    with torch.no_grad():
        dt = mixer.dt(dt_raw, clock)
        base = dt_raw + mixer.dt_bias
        lo, hi = F.softplus(base - 2.0), F.softplus(base + 2.0)
    assert torch.isfinite(dt).all()
    assert (dt >= lo * (1 - 1e-5)).all() and (dt <= hi * (1 + 1e-5)).all()


def test_clock_starts_neutral_and_then_moves_dt():
    mixer = Mamba2Mixer(16, clock_dim=3, **KW)
    dt_raw = torch.randn(1, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(mixer.dt(dt_raw, torch.randn(1, 5, 3) * 100), F.softplus(dt_raw + mixer.dt_bias))
        torch.nn.init.ones_(mixer.clock_proj.weight)
        calm = mixer.dt(dt_raw, torch.full((1, 5, 3), -5.0))
        storm = mixer.dt(dt_raw, torch.full((1, 5, 3), 5.0))
    assert (storm > calm).all()


def test_initialisation_ranges():
    mixer = Mamba2Mixer(64, d_state=16, n_heads=16, dt_min=1e-3, dt_max=0.1)
    dt0 = F.softplus(mixer.dt_bias.detach())
    assert (dt0 >= 1e-3 * (1 - 1e-4)).all() and (dt0 <= 0.1 * (1 + 1e-4)).all()
    A = torch.exp(mixer.A_log.detach())
    assert (A >= 1).all() and (A <= 16).all()
    assert mixer.head_dim == 8
    assert math.isclose(float(mixer.D.detach().mean()), 1.0)


def test_bad_arguments_are_rejected():
    with pytest.raises(ConfigError, match="n_heads"):
        Mamba2Mixer(16, n_heads=5)
    with pytest.raises(ConfigError, match="dt_max_delta"):
        Mamba2Mixer(16, n_heads=4, dt_max_delta=-1.0)
    mixer = Mamba2Mixer(16, clock_dim=3, **KW)
    with pytest.raises(ValueError, match="clock"):
        mixer(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="clock"):
        mixer(torch.randn(1, 4, 16), torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="clock_dim=0"):
        Mamba2Mixer(16, **KW)(torch.randn(1, 4, 16), torch.randn(1, 4, 3))
