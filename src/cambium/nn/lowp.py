"""Block-scaled low-precision formats, emulated: quantise to the format's values, dequantise back to fp32.

Formats (OCP Microscaling spec v1.0 and NVIDIA's NVFP4):
- E4M3 ("fn" variant): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, NaN = S.1111.111; max 448.
- E2M1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; values ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; no inf/NaN.
- E8M0 (MX scale): a bare power of two 2^(e−127), e in 0..254; 0xFF is NaN.
- MXFP8: blocks of 32 E4M3 values sharing one E8M0 scale X = 2^(floor(log2(amax)) − 8) (8 = E4M3's largest exponent).
  amax/X lies in [256, 512), so values above 448·X saturate to ±448·X, as the spec prescribes.
- NVFP4: blocks of 16 E2M1 values sharing one E4M3 scale, times one fp32 scale per tensor s = amax_tensor / (448·6),
  chosen so that the largest block scale amax_block / (6·s) is at most 448.

Rounding is to nearest, ties to even, with saturation to the largest finite value (never overflow to NaN).
A block holding NaN or ±inf dequantises to all NaN (its scale is the NaN scale); the NVFP4 tensor scale is taken
over the finite values only.

`fake_quantize` is what the MoE expert matmuls use: quantise-dequantise in the forward pass and a straight-through
gradient, so training sees the forward rounding error of the format (real FP8/FP4 kernels are a separate, GPU-only
matter selected explicitly in config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cambium.core.errors import ConfigError

__all__ = [
    "E2M1",
    "E4M3",
    "FloatFormat",
    "LowPrecision",
    "decode_bits",
    "fake_quantize",
    "mxfp8_quantize",
    "nvfp4_quantize",
    "round_to_format",
]

LowPrecision = Literal["mxfp8", "nvfp4"]


@dataclass(frozen=True)
class FloatFormat:
    """A small IEEE-like binary float: `exp_bits` exponent bits with `bias`, `man_bits` mantissa bits, subnormals,
    largest finite value `max_finite`; `nan_code` is the one bit pattern (without sign) meaning NaN, if any."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_finite: float
    nan_code: int | None

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias


E4M3 = FloatFormat("e4m3", exp_bits=4, man_bits=3, bias=7, max_finite=448.0, nan_code=0b1111111)
E2M1 = FloatFormat("e2m1", exp_bits=2, man_bits=1, bias=1, max_finite=6.0, nan_code=None)
MX_BLOCK, NV_BLOCK = 32, 16
E4M3_EMAX = 8


def decode_bits(code: int, fmt: FloatFormat) -> float:
    """The value of bit pattern `code` (sign bit highest) in `fmt`, straight from the definition."""
    width = fmt.exp_bits + fmt.man_bits
    sign = -1.0 if (code >> width) & 1 else 1.0
    body = code & ((1 << width) - 1)
    if fmt.nan_code is not None and body == fmt.nan_code:
        return float("nan")
    exp, man = body >> fmt.man_bits, body & ((1 << fmt.man_bits) - 1)
    if exp == 0:
        return sign * man / 2**fmt.man_bits * 2.0**fmt.min_normal_exp
    return sign * (1 + man / 2**fmt.man_bits) * 2.0 ** (exp - fmt.bias)


def round_to_format(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round fp32 `x` to the nearest value of `fmt` (ties to even), saturating to ±max_finite; NaN stays NaN.

    The quantum at |x| is 2^(e − man_bits) with e = max(floor(log2|x|), min normal exponent); |x| / quantum is then
    an integer count whose parity is the parity of the mantissa's last bit, so round-half-even on it is RNE.
    """
    x = x.float()
    a = x.abs()
    _, ex = torch.frexp(a)  # a = m·2^ex with m in [0.5, 1): floor(log2 a) = ex − 1, exact
    e = (ex - 1).clamp_min(fmt.min_normal_exp)
    quantum_exp = e - fmt.man_bits
    q = torch.ldexp(torch.round(torch.ldexp(a, -quantum_exp)), quantum_exp)
    q = q.clamp_max(fmt.max_finite)
    return torch.where(torch.isnan(x), x, torch.copysign(q, x))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ConfigError(f"low-precision blocks of {block} need the last dimension ({x.shape[-1]}) divisible by it")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def mxfp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[..., n·32]` → (E4M3 values `[..., n, 32]` as fp32, scale exponents `[..., n]` as fp32 (NaN = NaN scale)).

    The dequantised tensor is values · 2^exponent.
    """
    b = _blocks(x, MX_BLOCK)
    amax = b.abs().amax(-1)
    _, ex = torch.frexp(amax)
    shared = (ex - 1 - E4M3_EMAX).clamp(-127, 127).float()
    shared = torch.where(amax == 0, torch.full_like(shared, -127.0), shared)
    shared = torch.where(torch.isfinite(amax), shared, torch.full_like(shared, float("nan")))
    values = round_to_format(torch.ldexp(b, -shared.nan_to_num(0.0)[..., None]), E4M3)
    values = torch.where(torch.isnan(shared)[..., None], torch.full_like(values, float("nan")), values)
    return values, shared


def nvfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[..., n·16]` → (E2M1 values `[..., n, 16]`, E4M3 block scales `[..., n]`, fp32 tensor scale `[]`).

    The dequantised tensor is values · block_scale · tensor_scale.
    """
    b = _blocks(x, NV_BLOCK)
    finite = torch.isfinite(b)
    g_amax = torch.where(finite, b.abs(), torch.zeros_like(b)).amax() if b.numel() else b.new_zeros(())
    tensor_scale = torch.where(g_amax > 0, g_amax / (E4M3.max_finite * E2M1.max_finite), torch.ones_like(g_amax))
    block_amax = b.abs().amax(-1)
    block_scale = round_to_format(block_amax / E2M1.max_finite / tensor_scale, E4M3)
    denom = (block_scale * tensor_scale)[..., None]
    values = round_to_format(torch.where(denom > 0, b / denom, torch.zeros_like(b)), E2M1)
    bad = ~finite.all(-1)
    block_scale = torch.where(bad, torch.full_like(block_scale, float("nan")), block_scale)
    values = torch.where(bad[..., None], torch.full_like(values, float("nan")), values)
    return values, block_scale, tensor_scale


def _dequantized(x: torch.Tensor, fmt: LowPrecision) -> torch.Tensor:
    if fmt == "mxfp8":
        values, shared = mxfp8_quantize(x)
        out = torch.ldexp(values, shared.nan_to_num(0.0)[..., None])
    elif fmt == "nvfp4":
        v4, block_scale, tensor_scale = nvfp4_quantize(x)
        out = v4 * (block_scale * tensor_scale)[..., None]
    else:
        raise ConfigError(f"low-precision format {fmt!r} is not one of 'mxfp8', 'nvfp4'")
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize(x: torch.Tensor, fmt: LowPrecision, dim: int = -1) -> torch.Tensor:
    """Quantise-dequantise `x` with blocks running along `dim` (the matmul's contraction dimension).

    Straight-through gradient: the backward pass treats the rounding as the identity.
    """
    moved = x.detach().movedim(dim, -1)
    q = _dequantized(moved, fmt).movedim(-1, dim)
    return x + (q - x).detach()
