from pathlib import Path

import pytest
import torch

from cambium.core.config import load
from cambium.core.errors import ConfigError
from cambium.worldmodel.config import CONFIG_MODEL, AlignmentWarning, EncoderConfig, TokenizerConfig
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.tokenizer import FSQTokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "worldmodel"
# The origin's shapes (d_model, n_layers, n_heads) and the trainable parameters they give here (context encoder,
# predictor, code embedding; the EMA target doubles the encoder, the tokenizer is separate).
SHAPES = {
    "s": ("S", 256, 12, 4, 5_659_696),
    "m": ("M", 1024, 24, 16, 161_945_728),
    "l": ("L", 2048, 48, 32, 1_251_216_384),
    "xl": ("XL", 4096, 32, 64, 3_373_976_576),
}


def trainable_params(cfg) -> int:
    with torch.device("meta"):  # shapes only: no memory for billions of parameters
        model = WorldModelJEPA(cfg.jepa, FSQTokenizer(cfg.tokenizer))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(SHAPES))
def test_tshirt_sizes_have_the_origin_shapes_and_are_aligned(name, recwarn):
    size, d_model, n_layers, n_heads, params = SHAPES[name]
    cfg = load(CONFIGS / f"{name}.toml", CONFIG_MODEL)
    enc = cfg.jepa.encoder
    assert (cfg.size, enc.d_model, enc.n_layers, enc.n_heads) == (size, d_model, n_layers, n_heads)
    assert enc.head_dim == 128
    assert not [w for w in recwarn if issubclass(w.category, AlignmentWarning)]
    assert trainable_params(cfg) == params


def test_tiny_loads_with_an_alignment_warning():
    with pytest.warns(AlignmentWarning, match="head_dim = d_model\\*expand/n_heads = 64"):
        cfg = load(CONFIGS / "tiny.toml", CONFIG_MODEL)
    assert cfg.size == "tiny" and cfg.pipeline.device == "cpu"


@pytest.mark.parametrize("name", ["m", "l", "xl"])
def test_large_sizes_reject_a_misaligned_head_dim(name):
    with pytest.raises(ConfigError, match="is not 128"):
        load(CONFIGS / f"{name}.toml", CONFIG_MODEL, ["jepa.encoder.n_heads=8"])


def test_small_sizes_only_warn():
    with pytest.warns(AlignmentWarning):
        load(CONFIGS / "s.toml", CONFIG_MODEL, ["jepa.encoder.n_heads=8"])


def test_defaults_are_the_documented_ones():
    enc = EncoderConfig()
    assert enc.dt_max_delta == 2.0 and enc.backbone == "mamba2" and enc.exo_clock
    assert TokenizerConfig().fsq_levels == (8, 5, 5, 5)


def test_inconsistent_values_name_the_fields():
    with pytest.raises(ConfigError, match="receptive field"):
        load(CONFIGS / "tiny.toml", CONFIG_MODEL, ["tokenizer.n_layers=1"])
    with pytest.raises(ConfigError, match="block_size_min"):
        load(CONFIGS / "tiny.toml", CONFIG_MODEL, ["jepa.masking.block_size_min=9"])
    with pytest.raises(ConfigError, match="fsq_levels"):
        load(CONFIGS / "tiny.toml", CONFIG_MODEL, ["tokenizer.fsq_levels=[8, 1]"])


def test_a_huge_tokenizer_depth_is_refused_at_once() -> None:
    """Found by tests/core/test_config_fuzz.py: the receptive-field check summed dilation_base**i over n_layers, so a
    huge n_layers hung validation (pytest-timeout ends a hang)."""
    with pytest.raises(ConfigError, match=r"tokenizer\.n_layers"):
        load(CONFIGS / "tiny.toml", CONFIG_MODEL, ["tokenizer.n_layers=10000000000"])
    # The check stops once the patch is covered: a deep stack with a large dilation base validates at once.
    deep = load(CONFIGS / "tiny.toml", CONFIG_MODEL, ["tokenizer.n_layers=64", "tokenizer.dilation_base=1000000"])
    assert deep.tokenizer.n_layers == 64
