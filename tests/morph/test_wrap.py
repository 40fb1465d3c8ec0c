"""MOR-2/MOR-4: dormant seeds are exact identities that only collect telemetry; a TRAINING seed is isolated."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cambium.core.errors import ConfigError
from cambium.morph.config import SeedsConfig
from cambium.morph.contracts import SeedState
from cambium.morph.hosts import HostCNN, TransformerStack
from cambium.morph.slots import Mode
from cambium.morph.telemetry import health_reference
from cambium.morph.wrap import suggest_locations, wrap


def _cnn():
    torch.manual_seed(0)
    return HostCNN((4, 8, 8))


def _stack():
    torch.manual_seed(0)
    return TransformerStack(vocab=16, dim=16, heads=2, depth=3)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_dormant_seeds_are_identity(kind):
    if kind == "cnn":
        host, x = _cnn(), torch.randn(5, 3, 32, 32)
        locs = ("stages.0", "stages.1", "stages.2")
    else:
        host, x = _stack(), torch.randint(0, 16, (4, 10))
        locs = suggest_locations(host, (nn.TransformerEncoderLayer,))
        assert locs == ("blocks.0", "blocks.1", "blocks.2")
    ref = copy.deepcopy(host)
    model = wrap(host, SeedsConfig(telemetry_every=1), locs)
    out, out_ref = model(x), ref(x)
    assert torch.equal(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    g, g_ref = _grads(model.host), _grads(ref)
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=0, atol=0)
    assert model.telemetry.field("n_fwd").tolist() == [1.0] * len(locs)
    assert model.telemetry.field("n_bwd").tolist() == [1.0] * len(locs)


def test_bad_location_is_a_config_error():
    with pytest.raises(ConfigError, match=r"\['stages.9'\] are not modules of HostCNN"):
        wrap(_cnn(), SeedsConfig(), ("stages.9",))


def test_telemetry_matches_scalar_reference():
    """The vectorised SoA accumulation equals a per-batch Python loop, field by field."""
    host = _cnn()
    ref_host = copy.deepcopy(host)
    cfg = SeedsConfig(telemetry_every=1, var_floor=0.01, pressure_ref=0.5)
    model = wrap(host, cfg, ("stages.0", "stages.1"))
    acts: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    grads: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for step in range(3):
        torch.manual_seed(step)
        x = torch.randn(20, 3, 32, 32)  # more rows than telemetry.ROWS: activation stats use the first 16
        model(x).logsumexp(dim=1).mean().backward()
        # Reference: activations and dL/dx at each location from the unwrapped copy and autograd.grad.
        h0 = ref_host.stages[0](x)
        h1 = ref_host.stages[1](h0)
        h2 = ref_host.stages[2](h1)
        loss = ref_host.head(h2.mean(dim=(2, 3))).logsumexp(dim=1).mean()
        g0, g1 = torch.autograd.grad(loss, (h0, h1))
        acts[0].append(h0.detach())
        acts[1].append(h1.detach())
        grads[0].append(g0)
        grads[1].append(g1)
    signals = model.telemetry.summarize(7, [SeedState.DORMANT] * 2, ["a", "b"])
    for i in (0, 1):
        ref = health_reference(acts[i], grads[i], model.telemetry.params)
        got = signals[i]
        got_t = (got.activation_mean, got.activation_variance, got.gradient_norm, got.dead_unit_ratio,
                 got.health_score, got.confidence)
        for a, b in zip(got_t, ref, strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
        assert got.samples == 3 and got.epoch == 7


def test_dead_units_lower_health():
    host = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        host[0].bias[:6] = -100.0  # 6 of 8 units never fire
    model = wrap(host, SeedsConfig(telemetry_every=1), ("1",))
    for _ in range(4):
        model(torch.randn(16, 4)).sum().backward()
    sig = model.telemetry.summarize(0, [SeedState.DORMANT], ["s"])[0]
    assert sig.dead_unit_ratio == pytest.approx(0.75)
    assert sig.health_score < 0.25
    assert sig.confidence == pytest.approx(4 / 8)


def test_training_seed_changes_no_host_gradient():
    """Gradient isolation: host grads with a TRAINING seed (and after its own update) equal those without it."""
    host = _cnn()
    ref = copy.deepcopy(host)
    model = wrap(host, SeedsConfig(telemetry_every=1), ("stages.1",))
    slot = model.slot("stages.1")
    slot.kernel = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    slot.mode = Mode.SHADOW
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    ref_out = ref(x)
    nn.functional.cross_entropy(ref_out, y).backward()
    assert torch.equal(out, ref_out)
    g, g_ref = _grads(model.host), _grads(ref)
    for k in g_ref:
        assert torch.equal(g[k], g_ref[k]), k
    # The slot captured dL/dx at its location; the seed's own update touches no host gradient.
    assert slot.captured_grad is not None and slot.captured_grad.shape == (4, 8, 8, 8)
    target = -slot.captured_grad * 4
    seed_loss = (slot.kernel(slot.captured_x) - target).square().mean()
    seed_loss.backward()
    assert all(p.grad is not None for p in slot.kernel.parameters())
    for k in g_ref:
        assert torch.equal(dict(model.host.named_parameters())[k].grad, g_ref[k]), k


def test_transformer_stack_grows_through_the_lifecycle(tmp_path):
    """The full loop on a block stack: token-layout blueprints are chosen, compiled, trained and grafted."""
    from cambium.morph.config import LibraryConfig, LifecycleConfig, MorphConfig, PolicyConfig
    from cambium.morph.loop import Tolaria, assemble

    host = _stack()
    cfg = MorphConfig(
        seeds=SeedsConfig(locations=("blocks.0", "blocks.2"), telemetry_every=1),
        lifecycle=LifecycleConfig(graft_steps=4, min_explained=-1.0, min_delta=-1.0, fine_tune_tolerance=1.0),
        policy=PolicyConfig(health_threshold=1.0, confidence_threshold=0.0),
        library=LibraryConfig(root=tmp_path / "urza", benchmark_repeats=1),
    )
    m = assemble(host, cfg)
    try:
        opt = torch.optim.AdamW(m.kasmina.host_parameters(), lr=1e-3)

        def loss_fn(logits, tokens):
            return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16), tokens[:, 1:].reshape(-1))

        @torch.no_grad()
        def val() -> float:
            m.model.eval()
            return -float(loss_fn(m.model(data[0]), data[0]))

        t = Tolaria(m, opt, loss_fn)
        g = torch.Generator().manual_seed(0)
        data = [torch.randint(0, 16, (4, 10), generator=g) for _ in range(6)]
        for epoch in range(7):
            res = t.train_epoch((x, x) for x in data)
            t.end_epoch(epoch, res, val)
            assert res.anomaly is None
        for loc in ("blocks.0", "blocks.2"):
            assert m.model.slot(loc).shape == ("B", "T", 16)
            path = [c.target for c in m.kasmina.seeds[loc].life.history]
            assert path[:6] == [SeedState.GERMINATED, SeedState.LOADING, SeedState.TRAINING, SeedState.GRAFTING,
                                SeedState.STABILIZATION, SeedState.EVALUATING], (loc, path)
        assert m.urza.blueprint(m.kasmina.seeds["blocks.0"].blueprint_id or "").family == "low_rank_adapter"
    finally:
        m.close()
