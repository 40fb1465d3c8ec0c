"""MXFP8 / NVFP4 emulation against the format definitions: bit-level value tables, round-to-nearest-even,
saturation, special values, block scales and error bounds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cambium.core.errors import ConfigError
from cambium.nn.lowp import (
    E2M1,
    E4M3,
    FloatFormat,
    decode_bits,
    fake_quantize,
    mxfp8_quantize,
    nvfp4_quantize,
    round_to_format,
)


def _positive_table(fmt: FloatFormat) -> list[float]:
    """Non-negative finite values in code order (monotone increasing)."""
    width = fmt.exp_bits + fmt.man_bits
    values = [decode_bits(c, fmt) for c in range(1 << width)]
    return [v for v in values if not math.isnan(v)]


def _nearest_even(x: float, table: list[float]) -> float:
    """Brute force: nearest table value, ties to the even code; beyond the top, saturate."""
    a = abs(x)
    if a >= table[-1]:
        return math.copysign(table[-1], x)
    best = min(range(len(table)), key=lambda i: (abs(table[i] - a), i % 2))
    return math.copysign(table[best], x)


def test_bit_level_tables() -> None:
    e4m3 = _positive_table(E4M3)
    assert len(e4m3) == 127 and e4m3[0] == 0.0
    assert decode_bits(0b0_0000_001, E4M3) == 2.0**-9  # smallest subnormal
    assert decode_bits(0b0_0001_000, E4M3) == 2.0**-6  # smallest normal
    assert decode_bits(0b0_1111_110, E4M3) == 448.0 == E4M3.max_finite
    assert math.isnan(decode_bits(0b1_1111_111, E4M3))
    assert decode_bits(0b1_0111_100, E4M3) == -1.5
    assert _positive_table(E2M1) == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert all(b > a for a, b in itertools.pairwise(e4m3))


@pytest.mark.parametrize("fmt", [E4M3, E2M1])
def test_representable_values_round_trip(fmt: FloatFormat) -> None:
    table = torch.tensor(_positive_table(fmt))
    values = torch.cat([table, -table])
    assert torch.equal(round_to_format(values, fmt), values)


@pytest.mark.parametrize("fmt", [E4M3, E2M1])
def test_round_to_nearest_even_against_brute_force(fmt: FloatFormat) -> None:
    table = _positive_table(fmt)
    midpoints = [(a + b) / 2 for a, b in itertools.pairwise(table)]
    gen = torch.Generator().manual_seed(0)
    randoms = (torch.randn(2000, generator=gen) * table[-1] / 3).tolist()
    xs = midpoints + [-m for m in midpoints] + randoms + [table[-1] * 1.01, table[-1] * 50]
    got = round_to_format(torch.tensor(xs), fmt).tolist()
    want = [_nearest_even(x, table) for x in xs]
    assert got == want


def test_e2m1_ties_and_saturation_by_hand() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, -100.0, float("inf"), float("-inf")])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, -6.0, 6.0, -6.0])
    assert torch.equal(round_to_format(x, E2M1), expected)
    assert torch.isnan(round_to_format(torch.tensor([float("nan")]), E2M1)).all()


def test_e4m3_matches_torch_float8_in_range() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(5000, generator=gen) * 50, torch.randn(1000, generator=gen) * 1e-2])
    x = x.clamp(-448, 448)
    assert torch.equal(round_to_format(x, E4M3), x.to(torch.float8_e4m3fn).float())
    # Beyond 448 we saturate (the OCP "saturating" conversion), where a plain cast would give NaN.
    assert round_to_format(torch.tensor([470.0, 1e9, float("inf")]), E4M3).tolist() == [448.0, 448.0, 448.0]


def test_mxfp8_scale_is_the_e8m0_power_of_two() -> None:
    x = torch.zeros(3, 32)
    x[0, 5] = 3.0  # floor(log2 3) = 1 → exponent 1 − 8 = −7
    x[1, :] = torch.linspace(-0.01, 0.02, 32)  # amax 0.02: floor(log2) = −6 → −14
    values, exps = mxfp8_quantize(x)
    assert exps[:, 0].tolist() == [-7.0, -14.0, -127.0]  # all-zero block: the smallest scale
    assert values[2].abs().sum() == 0
    deq = torch.ldexp(values, exps[..., None]).reshape(3, 32)
    assert deq[0, 5] == 3.0


def test_mxfp8_exact_values_round_trip_and_saturation() -> None:
    gen = torch.Generator().manual_seed(2)
    table = torch.tensor(_positive_table(E4M3))
    picks = table[torch.randint(0, len(table), (4, 32), generator=gen)] * torch.where(
        torch.rand(4, 32, generator=gen) < 0.5, -1.0, 1.0
    )
    picks[:, 0] = 256.0  # amax in [256, 512): the scale is 2^0, so every E4M3 value below is representable
    scale = torch.tensor([2.0**-20, 2.0**-3, 1.0, 2.0**30])[:, None]
    x = picks * scale
    assert torch.equal(fake_quantize(x, "mxfp8"), x)
    # amax = 480·2^k lands in [256, 512)·2^k with scale 2^k but exceeds 448·2^k: it saturates.
    y = torch.zeros(1, 32)
    y[0, 0], y[0, 1] = 480.0 * 2**-4, 1.0 * 2**-4
    out = fake_quantize(y, "mxfp8")
    assert out[0, 0] == 448.0 * 2**-4 and out[0, 1] == 2**-4


def test_mxfp8_error_bound_on_random_data() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 128, generator=gen) * torch.logspace(-6, 6, 128)
    out = fake_quantize(x, "mxfp8")
    _, exps = mxfp8_quantize(x)
    scale = torch.ldexp(torch.ones(()), exps).repeat_interleave(32, dim=-1)
    err = (out - x).abs()
    scaled = x.abs() / scale
    normal = (scaled >= 2.0**-6) & (scaled <= 448)
    assert torch.all(err[normal] <= x.abs()[normal] * 2.0**-4)  # half an ulp of a 3-bit mantissa
    assert torch.all(err[scaled < 2.0**-6] <= scale[scaled < 2.0**-6] * 2.0**-10)  # half the subnormal step
    saturated = scaled > 448
    assert torch.all(out.abs()[saturated] == 448 * scale[saturated])


def test_mxfp8_non_finite_poisons_only_its_block() -> None:
    x = torch.ones(2, 64)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    out = fake_quantize(x, "mxfp8")
    assert torch.isnan(out[0, :32]).all() and torch.equal(out[0, 32:], torch.ones(32))
    assert torch.isnan(out[1, 32:]).all() and torch.equal(out[1, :32], torch.ones(32))


def test_nvfp4_scales_and_values_follow_the_definition() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 64, generator=gen) * torch.logspace(-3, 2, 8)[:, None]
    values, block_scale, tensor_scale = nvfp4_quantize(x)
    assert tensor_scale.item() == pytest.approx(x.abs().max().item() / (448 * 6), rel=1e-6)
    assert torch.equal(round_to_format(block_scale, E4M3), block_scale)  # block scales are E4M3 values
    assert block_scale.max() <= 448
    assert torch.equal(round_to_format(values, E2M1), values)  # elements are E2M1 values
    blocks = x.view(8, 4, 16)
    expected_scale = round_to_format(blocks.abs().amax(-1) / 6 / tensor_scale, E4M3)
    assert torch.equal(block_scale, expected_scale)
    expected_values = round_to_format(blocks / (block_scale * tensor_scale)[..., None], E2M1)
    assert torch.equal(values, expected_values)


def test_nvfp4_error_bound_zero_block_and_round_trip() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=gen) * torch.logspace(-2, 2, 16)[:, None]
    x[3, 16:32] = 0.0
    out = fake_quantize(x, "nvfp4")
    assert torch.equal(out[3, 16:32], torch.zeros(16))
    block_amax = x.view(16, 4, 16).abs().amax(-1, keepdim=True)
    # Half the widest E2M1 step (1 of 6) times the block scale (≤ amax/6·(1 + 2^-4) after E4M3 rounding).
    assert torch.all((out - x).view(16, 4, 16).abs() <= 0.18 * block_amax + 1e-12)
    # Values on the E2M1 grid whose block reaches 6 come back (up to fp32 rounding of the scales).
    grid = torch.tensor(_positive_table(E2M1))
    y = grid[torch.randint(0, 8, (2, 32), generator=gen)]
    y[:, 0], y[:, 16] = 6.0, 6.0
    torch.testing.assert_close(fake_quantize(y, "nvfp4"), y, rtol=1e-6, atol=0)


def test_nvfp4_non_finite_block_is_nan_and_tensor_scale_ignores_it() -> None:
    x = torch.ones(1, 32)
    x[0, 2] = float("inf")
    _values, block_scale, tensor_scale = nvfp4_quantize(x)
    assert tensor_scale.item() == pytest.approx(1 / 2688)
    assert torch.isnan(block_scale[0, 0]) and block_scale[0, 1] == 448
    out = fake_quantize(x, "nvfp4")
    assert torch.isnan(out[0, :16]).all() and torch.allclose(out[0, 16:], torch.ones(16))


def test_fake_quantize_blocks_along_dim_and_passes_gradients_straight_through() -> None:
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(32, 5, generator=gen, requires_grad=True)
    along0 = fake_quantize(w, "mxfp8", dim=0)
    torch.testing.assert_close(along0, fake_quantize(w.detach().T, "mxfp8").T, rtol=0, atol=0)
    g = torch.randn(32, 5, generator=gen)
    (along0 * g).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, g)
    with pytest.raises(ConfigError, match="divisible"):
        fake_quantize(torch.randn(3, 20), "nvfp4")
