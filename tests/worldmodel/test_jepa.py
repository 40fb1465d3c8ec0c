import pytest
import torch

from cambium.worldmodel.config import (
    EMAConfig,
    EncoderConfig,
    JEPAConfig,
    MaskingConfig,
    PredictorConfig,
    TokenizerConfig,
    TrainConfig,
)
from cambium.worldmodel.features import N_MARKET_CLOCK, CandleBatch, clock_features
from cambium.worldmodel.jepa import WorldModelJEPA, block_mask, ema_momentum, vicreg_terms
from cambium.worldmodel.tokenizer import FSQTokenizer
from cambium.worldmodel.training import fit_jepa, sample_windows

TOK = TokenizerConfig(patch_length=8, hidden_channels=8, n_layers=3, fsq_levels=(5, 5, 5))


def make_model(backbone: str = "mamba2", seq_len: int = 16, seed: int = 0) -> WorldModelJEPA:
    torch.manual_seed(seed)
    enc = EncoderConfig(backbone=backbone, d_model=16, n_layers=2, n_heads=2, d_state=4, chunk_size=8)
    cfg = JEPAConfig(seq_len=seq_len, encoder=enc, predictor=PredictorConfig(hidden_dim=32, dropout=0.0),
                     masking=MaskingConfig(mask_ratio=0.5, block_size_min=2, block_size_max=4))
    model = WorldModelJEPA(cfg, FSQTokenizer(TOK))
    for layer in model.context_encoder.layers:
        if backbone == "mamba2":
            torch.nn.init.normal_(layer.mixer.clock_proj.weight)  # the clock starts neutral; make it matter here
    model.update_target(0.0)
    return model


@pytest.mark.parametrize("n", [8, 17, 64])
def test_block_mask_covers_the_ratio_and_keeps_the_first_position(n):
    cfg = MaskingConfig(mask_ratio=0.4, block_size_min=2, block_size_max=5)
    mask = block_mask(16, n, cfg, torch.Generator().manual_seed(n))
    assert mask.shape == (16, n)
    assert (mask.sum(dim=1) == max(1, min(n - 1, round(0.4 * n)))).all()
    assert not mask[:, 0].any()
    again = block_mask(16, n, cfg, torch.Generator().manual_seed(n))
    assert torch.equal(mask, again)


def test_vicreg_terms_against_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    var, cov = vicreg_terms(x.bfloat16(), gamma=1.0, eps=1e-4)
    assert var.dtype == torch.float32 and cov.dtype == torch.float32
    xb = x.bfloat16().double()
    c = torch.cov(xb.T)
    expected_var = torch.clamp(1.0 - torch.sqrt(torch.diagonal(c) + 1e-4), min=0).mean()
    expected_cov = sum(c[i, j] ** 2 for i in range(6) for j in range(6) if i != j) / 6
    torch.testing.assert_close(var.double(), expected_var, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cov.double(), expected_cov, atol=1e-4, rtol=1e-5)
    collapsed, _ = vicreg_terms(torch.ones(10, 4), gamma=1.0, eps=1e-4)
    assert collapsed.item() == pytest.approx(1.0 - 1e-2)


def test_ema_momentum_schedule_and_update():
    cfg = EMAConfig(tau_start=0.99, tau_end=1.0)
    assert ema_momentum(0, 100, cfg) == pytest.approx(0.99)
    assert ema_momentum(50, 100, cfg) == pytest.approx(0.995)
    assert ema_momentum(100, 100, cfg) == pytest.approx(1.0)
    model = make_model()
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for t, c, b in zip(model.target_encoder.parameters(), model.context_encoder.parameters(), before, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * c)


def test_gradients_reach_context_and_predictor_but_not_target_or_tokenizer():
    model = make_model()
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 125, (4, 16), generator=gen)
    clock = torch.randn(4, 16, 6, generator=gen)
    mask = block_mask(4, 16, model.cfg.masking, gen)
    out = model(idx, clock, mask)
    out.loss.backward()
    assert out.pred.shape == out.target.shape == (int(mask.sum()), 16)
    assert all(p.grad is not None for p in model.context_encoder.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
    assert model.mask_token.grad is not None and model.embed.weight.grad is not None
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is None for p in model.tokenizer.parameters())


def test_context_never_sees_the_market_clock_of_masked_positions():
    model = make_model().eval()
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 125, (2, 16), generator=gen)
    clock = torch.randn(2, 16, 6, generator=gen)
    mask = block_mask(2, 16, model.cfg.masking, gen)
    leaked = clock.clone()
    leaked[..., :N_MARKET_CLOCK] += 50.0 * mask.unsqueeze(-1)
    h1 = model(idx, clock, mask).context
    h2 = model(idx, leaked, mask).context
    torch.testing.assert_close(h1, h2)
    visible = clock.clone()
    visible[..., :N_MARKET_CLOCK] += 50.0 * (~mask).unsqueeze(-1)
    assert not torch.allclose(model(idx, visible, mask).context, h1)


@pytest.mark.parametrize("backbone", ["mamba2", "attention", "nested"])
def test_encode_candles_gives_causal_latents(backbone, make_candles):
    model = make_model(backbone).eval()
    candles = make_candles(2, 8 * 12 + 5)
    z = model.encode(candles)
    assert z.shape == (2, 12, 16)
    changed = candles.ohlcv.clone()
    changed[:, -8:, :4] *= torch.linspace(0.7, 1.4, 8, dtype=torch.float64).view(1, 8, 1)
    changed[:, -8:, 4] *= 20
    z2 = model.encode(CandleBatch(changed, candles.open_time_ms))
    torch.testing.assert_close(z2[:, :-1], z[:, :-1])
    assert not torch.allclose(z2[:, -1], z[:, -1])
    indices = model.tokenizer.tokenize(candles.ohlcv.float())
    torch.testing.assert_close(model.encode_codes(indices, clock_features(candles, 8)), z)


def test_jepa_learns_to_predict_a_predictable_sequence():
    # Each sequence cycles through 3 random codes: a masked position is predictable from the visible cycle before it,
    # so the prediction error must fall well below the target variance (what predicting the mean would give).
    torch.manual_seed(0)
    enc = EncoderConfig(d_model=16, n_layers=2, n_heads=2, d_state=8, chunk_size=8)
    cfg = JEPAConfig(seq_len=24, encoder=enc, predictor=PredictorConfig(hidden_dim=32, dropout=0.0),
                     masking=MaskingConfig(mask_ratio=0.3, block_size_min=1, block_size_max=3),
                     ema=EMAConfig(tau_start=0.99, tau_end=0.999))
    model = WorldModelJEPA(cfg, FSQTokenizer(TokenizerConfig(patch_length=8, hidden_channels=8, n_layers=3,
                                                             fsq_levels=(5, 5))))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    steps, ratios = 90, []
    for step in range(steps):
        idx = torch.randint(0, 25, (16, 3), generator=gen)[:, torch.arange(24) % 3]
        mask = block_mask(16, 24, cfg.masking, gen)
        mask[:, :3] = False
        out = model(idx, torch.zeros(16, 24, 6), mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_target(ema_momentum(step + 1, steps, cfg.ema))
        ratios.append(out.invariance.item() / out.target.float().var(dim=0).mean().item())
    assert ratios[0] > 0.9
    assert sum(ratios[-5:]) / 5 < 0.75


def effective_rank(z: torch.Tensor) -> float:
    s = torch.linalg.svdvals(z - z.mean(dim=0))
    p = s**2 / (s**2).sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def test_short_training_on_real_candles_keeps_latents_alive(real_series):
    model = make_model(seq_len=16)
    held_out = sample_windows(real_series[6:12], 16 * 8, 16, torch.Generator().manual_seed(5))
    rank_before = effective_rank(model.encode(held_out).reshape(-1, 16))
    train = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2)
    history = fit_jepa(model, real_series[:6], train, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in history)
    rank_after = effective_rank(model.encode(held_out).reshape(-1, 16))
    print(f"effective rank {rank_before:.2f} -> {rank_after:.2f}")
    assert rank_after > 0.8 * rank_before  # no collapse onto a few directions
