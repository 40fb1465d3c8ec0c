"""Hugging Face interchange (MOE-13): a random transformers DeepseekV3ForCausalLM imported gives the same logits, and
our model exported loads in transformers with the same logits (fp32 tolerance), both ways through safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cambium.core.config import load
from cambium.core.errors import ConfigError, DataError
from cambium.moe.config import MoEConfig
from cambium.moe.hf import from_hf_config, load_hf, save_hf, to_hf_config
from cambium.moe.model import MoETransformer

transformers = pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "moe" / "tiny.toml"


def _hf_config(**extra: object) -> object:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2, rms_norm_eps=1e-6)
    base.update(extra)
    return transformers.DeepseekV3Config(**base)


def _hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_import_of_a_random_deepseek_v3_gives_its_logits(tmp_path: Path, q_lora_rank: int | None) -> None:
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(q_lora_rank=q_lora_rank))
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        for layer in hf.model.layers[1:]:  # a trained-looking selection bias and non-unit norms
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
        for name, p in hf.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert list((tmp_path / "hf").glob("*.safetensors"))
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.cfg.moe is not None and ours.cfg.moe.n_groups == 2 and ours.cfg.moe.route_scale == 2.5
    tokens = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        got = ours(tokens).logits
    torch.testing.assert_close(got, _hf_logits(hf, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", [(), ("model.attention.q_lora_rank=16", "model.tie_embeddings=false")])
def test_export_loads_in_transformers_with_our_logits(tmp_path: Path, extra: tuple[str, ...]) -> None:
    cfg = load(TINY, MoEConfig, ["model.init_std=0.2", *extra]).model
    torch.manual_seed(1)
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.bias.normal_(0, 0.05)
    save_hf(model, tmp_path / "out")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True,
                                                           dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"
    tokens = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        ours = model(tokens).logits
    torch.testing.assert_close(_hf_logits(hf, tokens), ours, rtol=1e-4, atol=1e-4)
    # And back: the round trip is the identity on every tensor.
    again = load_hf(tmp_path / "out")
    for name, t in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], t, rtol=0, atol=0)


def test_what_deepseek_v3_cannot_express_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only MLA"):
        to_hf_config(load(TINY, MoEConfig, ["model.attention.kind=gqa"]).model)
    with pytest.raises(ConfigError, match="sigmoid"):
        to_hf_config(load(TINY, MoEConfig, ["model.moe.score_func=softmax"]).model)
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        from_hf_config(_hf_config(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                   "original_max_position_embeddings": 16}))
    with pytest.raises(DataError, match=r"no config\.json"):
        load_hf(tmp_path)


def test_import_hf_writes_a_config_that_trains_from_the_checkpoint(tmp_path: Path) -> None:
    """`import-hf` keeps the base config's data/optimiser and takes the checkpoint's architecture; the trainer starts
    from its weights and refuses a model table that does not match them."""
    from typer.testing import CliRunner

    from cambium.moe.cli import app
    from cambium.moe.train import build_model

    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(vocab_size=512))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = tmp_path / "imported.toml"
    result = CliRunner().invoke(app, ["import-hf", str(tmp_path / "hf"), "--config", str(TINY), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load(out, MoEConfig)
    assert (cfg.model.dim, cfg.model.moe.top_k, cfg.model.moe.seq_aux_coef) == (32, 3, 0.0001)  # type: ignore[union-attr]
    assert cfg.train.init_from_hf == tmp_path / "hf" and cfg.data.seq_len == 64
    model = build_model(cfg)
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, hf.eval()(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)
    wrong = load(out, MoEConfig, ["model.moe.expert_hidden=32"])
    with pytest.raises(ConfigError, match=r"model\.moe\.expert_hidden=32 \(checkpoint: 16\)"):
        build_model(wrong)


_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "hidden_act",
    "tie_word_embeddings", "model_type", "routed_scaling_factor",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(st.sampled_from(_FIELDS), st.one_of(
    st.integers(-3, 70), st.floats(allow_nan=True), st.text(max_size=6), st.none(), st.booleans(),
    st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=5), st.floats(), st.integers()), max_size=3)),
    max_size=8))
def test_a_damaged_config_json_is_one_cambium_error(tmp_path: Path, data: dict[str, object]) -> None:
    """Whatever config.json holds, `load_hf` / `import-hf` either import a model or raise one CambiumError."""
    import json

    from cambium.core.errors import CambiumError

    base = {"model_type": "deepseek_v3", **{k: v for k, v in _hf_config().to_dict().items() if k in _FIELDS}}
    path = tmp_path / "hf"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**base, **data}))
    try:
        load_hf(path)
    except CambiumError as exc:
        assert "\n" not in str(exc).strip() or len(str(exc)) < 2000
