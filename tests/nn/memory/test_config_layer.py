"""Memory config validation (undefined knob combinations rejected at load) and the memory layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cambium.core.config import load, load_data, to_toml
from cambium.core.errors import ConfigError
from cambium.nn.memory.config import MemoryConfig
from cambium.nn.memory.layer import MemoryLayer, TitansMemory
from cambium.nn.memory.presets import PRESETS, delta, titans_lmm


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"structure": "vector", "algorithm": "newton_schulz"}, "algorithm='newton_schulz'.*structure='vector'"),
        ({"retention": "kl", "algorithm": "momentum"}, "retention='kl'.*algorithm='momentum'"),
        ({"structure": "mlp", "retention": "sphere"}, "retention='sphere'.*structure='mlp'"),
        ({"l1": 0.1}, "l1=0.1.*retention='l2'"),
        ({"structure": "mlp", "read": "softmax"}, "read='softmax'.*structure='mlp'"),
        ({"structure": "mlp", "execution": "chunkwise_exact"}, "chunkwise_exact.*structure='mlp'"),
        ({"bias": "huber", "execution": "chunkwise_exact"}, "chunkwise_exact.*bias='huber'"),
        ({"retention": "kl", "execution": "chunkwise_approx"}, "chunkwise_approx.*retention='kl'"),
        ({"algorithm": "newton_schulz", "execution": "chunkwise_approx"},
         "chunkwise_approx.*algorithm='newton_schulz'"),
        ({"rule": "trellis", "bias": "huber"}, "rule='trellis'.*bias='huber'"),
        ({"lp_p": 0.5}, "lp_p"),
        ({"huber_delta": 0.0}, "huber_delta"),
    ],
)
def test_undefined_combinations_are_rejected_naming_the_knobs(knobs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_data(knobs, MemoryConfig)


def test_presets_are_valid_and_round_trip_through_toml(tmp_path: Path) -> None:
    for name, preset in PRESETS.items():
        cfg = preset()
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(cfg))
        assert load(path, MemoryConfig) == cfg
    assert load_data({}, MemoryConfig, ["execution=chunkwise_exact", "chunk_size=16"]).chunk_size == 16


def test_unknown_knob_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="structure"):
        load_data({"structure": "tensor"}, MemoryConfig)


@pytest.mark.parametrize("name", ["titans_lmm", "delta", "memora", "lattice_osr", "trellis"])
def test_layer_shapes_and_gradients_reach_every_parameter(name: str) -> None:
    layer = MemoryLayer(16, 2, PRESETS[name]())
    x = torch.randn(2, 9, 16)
    y, _ = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("cfg", [titans_lmm(), titans_lmm(execution="chunkwise_approx", chunk_size=4),
                                 delta(execution="chunkwise_exact", chunk_size=4)])
def test_context_memory_carries_across_calls(cfg: MemoryConfig) -> None:
    """Two calls with the state carried give the same outputs as one call over the whole segment."""
    layer = MemoryLayer(16, 2, cfg)
    x = torch.randn(1, 16, 16)
    with torch.no_grad():
        whole, end_whole = layer(x)
        first, mid = layer(x[:, :8])
        second, end_split = layer(x[:, 8:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(end_split.params, end_whole.params, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_titans_layer_under_bf16_autocast_keeps_fp32_memory() -> None:
    layer = TitansMemory(16, 2, chunk_size=4)
    x = torch.randn(1, 12, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = layer(x)
    assert y.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in (*state.params, *state.opt))
    y_ref, _ = layer(x)
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=5e-2)


def test_layer_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="dim=10 must be divisible by heads=3"):
        MemoryLayer(10, 3, delta())
    with pytest.raises(ConfigError, match=r"\[B, T, D\]"):
        MemoryLayer(8, 2, delta())(torch.randn(8, 8))
