import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import ConfigError, DataError
from cambium.nn.fsq import FSQ, codebook_usage, perplexity

LEVEL_SETS = [[8, 5, 5, 5], [8, 8, 4, 4], [7, 5, 3], [2, 2], [8, 8, 8, 2]]


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_each_channel_takes_exactly_its_levels(levels):
    fsq = FSQ(levels)
    z = torch.linspace(-12, 12, 20001).unsqueeze(-1).expand(-1, len(levels))
    codes = fsq.quantize(z)
    for i, L in enumerate(levels):
        values = torch.unique(codes[:, i])
        half = L // 2
        # Even levels use the half-step offset: integers -L/2 .. L/2-1, not a symmetric range.
        expected = torch.arange(-half, half + (L % 2)).float() / half
        assert torch.equal(values, expected), (L, values)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_zero_maps_to_the_centre_code(levels):
    fsq = FSQ(levels)
    codes, _ = fsq(torch.zeros(3, len(levels)))
    assert torch.equal(codes, torch.zeros_like(codes))


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_indices_codes_round_trip_over_the_whole_codebook(levels):
    fsq = FSQ(levels)
    n = math.prod(levels)
    assert fsq.codebook_size == n
    idx = torch.arange(n)
    codes = fsq.indices_to_codes(idx)
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    assert torch.unique(codes, dim=0).shape[0] == n
    assert codes.abs().max() <= 1.0


@settings(max_examples=50, deadline=None)
@given(
    levels=st.sampled_from(LEVEL_SETS),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 50.0),
)
def test_quantized_codes_round_trip_exactly(levels, seed, scale):
    fsq = FSQ(levels)
    z = torch.randn(64, len(levels), generator=torch.Generator().manual_seed(seed)) * scale
    codes, idx = fsq(z)
    assert idx.min() >= 0 and idx.max() < fsq.codebook_size
    assert torch.equal(fsq.indices_to_codes(idx), codes)
    assert torch.equal(fsq.codes_to_indices(codes), idx)


def test_straight_through_gradient_is_the_bound_derivative():
    fsq = FSQ([8, 5, 5, 5])
    z = torch.randn(32, 4, dtype=torch.float32, requires_grad=True)
    w = torch.randn(32, 4)
    (fsq.quantize(z) * w).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (fsq.bound(z2) / fsq._half_width * w).sum().backward()
    assert z.grad is not None and z2.grad is not None
    torch.testing.assert_close(z.grad, z2.grad)
    assert z.grad.abs().min() > 0  # rounding alone would give a zero gradient


def test_usage_and_perplexity_closed_forms():
    idx = torch.tensor([0, 1, 2, 3] * 5)
    assert codebook_usage(idx, 8) == 0.5
    assert perplexity(idx, 8) == pytest.approx(4.0)
    assert perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1.0)


def test_bad_levels_and_indices_are_rejected():
    with pytest.raises(ConfigError, match="levels"):
        FSQ([8, 1])
    with pytest.raises(ConfigError, match="levels"):
        FSQ([])
    with pytest.raises(DataError, match="1000"):
        FSQ([8, 5, 5, 5]).indices_to_codes(torch.tensor([1000]))
    with pytest.raises(ValueError, match="last dimension"):
        FSQ([8, 5, 5, 5])(torch.zeros(2, 3))
