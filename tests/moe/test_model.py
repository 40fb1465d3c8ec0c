"""The MoE transformer: shapes, causality, dense/MoE layout, tied embeddings, backends agree end to end, it learns,
and the shipped configs load and have their documented sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cambium.core.config import load, load_data
from cambium.core.errors import ConfigError
from cambium.moe.config import CONFIG_MODEL, ModelConfig
from cambium.moe.model import MoETransformer, flops_per_token, lm_loss
from cambium.nn.attention import MLA, Attention
from cambium.nn.mlp import SwiGLU
from cambium.nn.moe import MoE

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "moe"


def _tiny(*overrides: str) -> ModelConfig:
    return load(CONFIGS / "tiny.toml", CONFIG_MODEL, overrides).model


def _model(cfg: ModelConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(cfg)


@pytest.mark.parametrize("name", ["tiny", "moonlet-cpu", "moonlet", "moonlight"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load(CONFIGS / f"{name}.toml", CONFIG_MODEL)
    assert cfg.model.n_dense_layers <= cfg.model.n_layers


@pytest.mark.parametrize(
    ("name", "total", "active"),
    # Moonlight paper (arXiv:2502.16982): 15.29B total, 2.24B activated, both without embeddings.
    [("moonlight", 15.29e9, 2.24e9), ("moonlet", 1.178e9, 0.174e9)],
)
def test_documented_sizes(name: str, total: float, active: float) -> None:
    cfg = load(CONFIGS / f"{name}.toml", CONFIG_MODEL).model
    with torch.device("meta"):
        m = MoETransformer(cfg)
    assert m.num_params(embeddings=False) == pytest.approx(total, rel=5e-3)
    assert m.num_params(active=True, embeddings=False) == pytest.approx(active, rel=5e-3)


def test_layout_and_forward_shapes() -> None:
    cfg = _tiny()
    m = _model(cfg)
    assert isinstance(m.blocks[0].ffn, SwiGLU)
    assert all(isinstance(b.ffn, MoE) for b in m.blocks[1:])
    assert all(isinstance(b.attn, MLA) for b in m.blocks)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    out = m(tokens)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert len(out.moe) == cfg.n_layers - cfg.n_dense_layers
    assert all(int(a.load.sum()) == 2 * 16 * cfg.moe.top_k for a in out.moe)
    # At initialisation the prediction is close to uniform.
    loss = lm_loss(out.logits, torch.randint(0, cfg.vocab_size, (2, 16)))
    assert abs(loss.item() - torch.log(torch.tensor(float(cfg.vocab_size))).item()) < 0.5


def test_tied_and_untied_embeddings() -> None:
    tied, untied = _model(_tiny()), _model(_tiny("model.tie_embeddings=false"))
    assert tied.lm_head is None and untied.lm_head is not None
    assert untied.num_params() - tied.num_params() == 512 * 64
    assert {tied.param_kind(n) for n, _ in tied.named_parameters()} == {"embedding", "dense", "router", "expert"}


def test_gqa_variant_and_all_dense() -> None:
    data = load(CONFIGS / "tiny.toml", CONFIG_MODEL).model_dump(mode="json")
    data["model"].update(n_dense_layers=3, moe=None)
    cfg = load_data(data, CONFIG_MODEL, ["model.attention.kind=gqa", "model.attention.n_kv_heads=2"]).model
    m = _model(cfg)
    assert all(isinstance(b.attn, Attention) for b in m.blocks)
    out = m(torch.randint(0, 512, (1, 8)))
    assert out.moe == [] and out.aux_loss.item() == 0.0


def test_causal() -> None:
    m = _model(_tiny())
    tokens = torch.randint(0, 512, (1, 12))
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 512
    a, b = m(tokens).logits, m(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_backends_agree_through_the_model() -> None:
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    results = []
    for backend in ("loop", "padded_bmm", "grouped_mm"):
        m = _model(_tiny(f"model.moe.backend={backend}", "model.moe.z_loss_coef=0.001"))
        out = m(tokens)
        loss = lm_loss(out.logits[:, :-1], tokens[:, 1:]) + out.aux_loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    ref_loss, ref_grads = results[0]
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, ref_loss)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        assert grads["blocks.1.ffn.router.weight"].abs().sum() > 0


def test_learns_a_fixed_batch_and_updates_biases() -> None:
    m = _model(_tiny())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(15):
        out = m(tokens)
        loss = lm_loss(out.logits[:, :-1], tokens[:, 1:]) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.update_router_biases([a.load for a in out.moe], gamma=1e-3)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(layer.router.bias.abs().sum() > 0 for layer in m.moe_layers())
    with pytest.raises(ConfigError, match="1 load vectors for 2 MoE layers"):
        m.update_router_biases([torch.zeros(8)], 1e-3)


def test_router_bias_is_checkpointed() -> None:
    m = _model(_tiny())
    m.moe_layers()[0].update_bias(torch.arange(8), 0.01)
    state = m.state_dict()
    assert "blocks.1.ffn.router.bias" in state
    fresh = _model(_tiny(), seed=5)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.moe_layers()[0].router.bias, m.moe_layers()[0].router.bias)


def test_config_errors_name_the_field() -> None:
    base = load(CONFIGS / "tiny.toml", CONFIG_MODEL).model_dump()
    with pytest.raises(ConfigError, match=r"model.moe.*top_k=9 must be <= n_routed_experts=8"):
        load_data(base, CONFIG_MODEL, ["model.moe.top_k=9"])
    with pytest.raises(ConfigError, match="n_dense_layers=4 must be <= n_layers=3"):
        load_data(base, CONFIG_MODEL, ["model.n_dense_layers=4"])
    # An all-dense model would not read a moe table; a model with MoE layers cannot do without one.
    with pytest.raises(ConfigError, match=r"every layer is dense \(n_dense_layers = n_layers = 3\), so nothing "
                       "would read the moe table: remove it"):
        load_data(base, CONFIG_MODEL, ["model.n_dense_layers=3"])
    with pytest.raises(ConfigError, match=r"layers 1..2 are MoE .*: add the moe table"):
        load_data({**base, "model": {k: v for k, v in base["model"].items() if k != "moe"}}, CONFIG_MODEL)
    with pytest.raises(ConfigError, match="expert_hidden=40 must be a multiple of 16 for lowp=nvfp4"):
        load_data(base, CONFIG_MODEL, ["model.moe.lowp=nvfp4", "model.moe.expert_hidden=40"])
    with pytest.raises(ConfigError, match=r"sequence length 200 exceeds model\.max_seq_len=128"):
        _model(_tiny())(torch.zeros(1, 200, dtype=torch.long))


# MLA with v_head_dim = qk_nope + qk_rope: otherwise SDPA runs on zero-padded values and counts the padding.
@pytest.mark.parametrize(
    "overrides", [("model.attention.v_head_dim=24",), ("model.attention.kind=gqa", "model.attention.n_kv_heads=2")]
)
def test_flops_per_token_matches_counted_flops(overrides: tuple[str, ...]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # The loop backend computes exactly the routed rows (padded_bmm would also count its padding).
    m = _model(_tiny("model.moe.backend=loop", *overrides))
    tokens = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    # The math SDPA backend is made of matmuls the counter sees; it does not count the CPU flash kernel at all.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = m(tokens)
        lm_loss(out.logits, tokens).backward()
    counted = counter.get_total_flops() / tokens.numel()
    assert flops_per_token(m, 32) == pytest.approx(counted, rel=0.01)
