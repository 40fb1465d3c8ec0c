"""GradMax growth criterion (against a brute-force finite difference), Karn's mutants and Urabrask's tags in Tamiyo's
blueprint choice, `library.max_params`, GradMax placement, and the gradmax TRAINING objective (host untouched)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cambium.core.config import load, load_data
from cambium.core.errors import ConfigError
from cambium.morph.blueprints import make_blueprint
from cambium.morph.catalog import Catalog, Choice, Choices
from cambium.morph.compiler import Tezzeret, compile_module
from cambium.morph.config import CONFIG_MODEL, LibraryConfig, PolicyConfig
from cambium.morph.contracts import CompileSettings, HealthSignal, Seed, SeedState, SystemStatePacket
from cambium.morph.controller import HeuristicPolicy
from cambium.morph.growth import gradmax_gradient, gradmax_score, output_parameters
from cambium.morph.library import Urza

from ._harness import Harness

S = SeedState
F64 = CompileSettings(backend="eager", dtype="float64", init_seed=3)


class _TinyHost(nn.Module):
    """conv → (slot: x + f(x)) → conv → pool → linear, in float64."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, c, 3, padding=1).double()
        self.b = nn.Conv2d(c, c, 3, padding=1).double()
        self.head = nn.Linear(c, 3).double()
        self.kernel: nn.Module | None = None

    def forward(self, x: torch.Tensor, tap: list[torch.Tensor] | None = None) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if tap is not None:
            h.retain_grad()
            tap.append(h)
        if self.kernel is not None:
            h = h + self.kernel(h)
        return self.head(torch.relu(self.b(h)).mean(dim=(2, 3)))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 5, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("name", ["conv_bottleneck", "squeeze_excitation", "low_rank_adapter", "attention"])
def test_gradmax_gradient_matches_a_finite_difference_of_the_host_loss(name):
    """∇_θout L from the slot's (x, ∂L/∂x) equals a central difference of the full host's loss over every output
    parameter of the grafted, zero-initialised kernel."""
    host = _TinyHost()
    x, y = _data()
    kernel = compile_module(make_blueprint(name, ("B", 4, 5, 5)), F64)
    out = output_parameters(kernel)
    assert out and all(float(p.detach().abs().max()) == 0.0 for p in out)  # the output op starts at zero
    tap: list[torch.Tensor] = []
    nn.functional.cross_entropy(host(x, tap), y).backward()
    h, g = tap[0].detach(), tap[0].grad
    assert g is not None
    fast = gradmax_gradient(kernel, h, g)

    host.kernel = kernel
    kernel.train()
    before = copy.deepcopy(kernel.state_dict())
    eps = 1e-6
    for p, grad in zip(out, fast, strict=True):
        fd = torch.zeros_like(p)
        flat, fd_flat = p.data.view(-1), fd.view(-1)
        for i in range(flat.numel()):
            with torch.no_grad():
                flat[i] += eps
                up = float(nn.functional.cross_entropy(host(x), y))
                flat[i] -= 2 * eps
                down = float(nn.functional.cross_entropy(host(x), y))
                flat[i] += eps
            fd_flat[i] = (up - down) / (2 * eps)
        kernel.load_state_dict(before)  # the forwards moved batch-norm statistics
        assert float(fd.abs().max()) > 0
        torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)
    assert gradmax_score(kernel, h, g) == pytest.approx(sum(float(t.pow(2).sum()) for t in fast))


def test_gradmax_scoring_leaves_the_kernel_unchanged():
    kernel = compile_module(make_blueprint("conv_bottleneck", ("B", 4, 5, 5)), F64)
    state = copy.deepcopy(kernel.state_dict())
    h = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    gradmax_score(kernel, h, torch.randn_like(h))
    for k, v in kernel.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="differ in shape"):
        gradmax_gradient(kernel, h, h[:2])


# --- the catalog: templates + Karn's mutants, compiled, tagged, within max_params ---------------------------------

SHAPE = ("B", 8, 4, 4)


@pytest.fixture
def library(tmp_path):
    urza = Urza.local(tmp_path / "urza")
    tz = Tezzeret(urza, benchmark_repeats=1)
    yield urza, tz
    tz.close()


def _choices(library, probe, **cfg):
    urza, tz = library
    lib = LibraryConfig(**{k: v for k, v in cfg.items() if k in LibraryConfig.model_fields})
    pol = PolicyConfig(**{k: v for k, v in cfg.items() if k in PolicyConfig.model_fields})
    catalog = Catalog(urza, tz, pol, lib, CompileSettings(init_seed=0), seed=0)
    return catalog, Choices(catalog, lambda _seed_id: probe)


def _probe(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, *SHAPE[1:], generator=g)
    return x, torch.randn(x.shape, generator=g) * 1e-2


def _seed(shape=SHAPE, failures=0, blueprint_id=None, i=0):
    return Seed(seed_id=f"s{i}", index=i, location=f"l{i}", state=S.DORMANT, failures=failures,
                blueprint_id=blueprint_id, shape=shape)


def test_a_karn_mutant_is_proposed_compiled_tagged_and_chosen_when_it_fits_best(library):
    urza, _ = library
    probe = _probe()
    catalog, choices = _choices(library, probe, blueprints_conv=("low_rank_adapter",), mutants_per_blueprint=2,
                                blueprint_choice="gradmax")
    options = catalog.options(SHAPE)
    mutants = [o for o in options if o.blueprint.parent_id is not None]
    assert len(options) == 3 and len(mutants) == 2
    for o in options:  # every option is stored, compiled, hash-verified on load and tagged in all four classes
        record, _ = urza.kernel(o.artifact.artifact_id)
        assert record.blueprint_id == o.blueprint.blueprint_id and len(o.tags) == 4
    ranked = choices.rank(_seed())
    scores = {c.blueprint_id: c.score for c in ranked}
    assert [c.score for c in ranked] == sorted(scores.values(), reverse=True)  # the largest GradMax score first
    assert all(s > 0 for s in scores.values())
    # The rank-r adapter's mutants halve or double r: the doubled one has the larger gradient to give.
    best = ranked[0]
    assert best.name.startswith("low_rank_adapter~") and best.param_count > urza.template(
        "low_rank_adapter", SHAPE).param_count
    # ... and the policy germinates it, by id (a mutant has no template name).
    policy = HeuristicPolicy(PolicyConfig(blueprint_choice="gradmax", health_threshold=0.5), 2, rank=choices.rank)
    out = policy.decide(_packet([(_seed(), 0.1)]))
    assert [s.blueprint_id for s in out] == [best.blueprint_id] and "gradmax" in out[0].reason


def test_a_blueprint_over_max_params_is_never_offered_or_chosen(library):
    urza, _ = library
    template = urza.template("conv_bottleneck", SHAPE)
    catalog, choices = _choices(library, _probe(), mutants_per_blueprint=3, max_params=template.param_count - 1,
                                blueprint_choice="gradmax")
    options = catalog.options(SHAPE)
    assert options and all(o.blueprint.param_count <= template.param_count - 1 for o in options)
    assert template.blueprint_id not in {c.blueprint_id for c in choices.rank(_seed())}


def test_urabrask_tags_change_the_choice(library):
    """Squeeze-excitation (no running statistics: risk_low) against the conv bottleneck (batch norm: risk_high)."""
    probe = _probe()
    conv = ("conv_bottleneck", "squeeze_excitation")
    _, free = _choices(library, probe, blueprints_conv=conv, blueprint_choice="gradmax")
    ranked = free.rank(_seed())
    assert ranked[0].name == "conv_bottleneck" and "risk_high" in ranked[0].tags  # it has the larger score here
    _, avoid = _choices(library, probe, blueprints_conv=conv, blueprint_choice="gradmax", avoid_tags=("risk_high",))
    assert [c.name for c in avoid.rank(_seed())] == ["squeeze_excitation"]
    _, prefer = _choices(library, probe, blueprints_conv=conv, blueprint_choice="gradmax", prefer_tags=("risk_low",))
    assert [c.name for c in prefer.rank(_seed())] == ["squeeze_excitation", "conv_bottleneck"]
    # A blueprint that failed at the location goes last.
    failed = _seed(failures=1, blueprint_id=ranked[0].blueprint_id)
    assert free.rank(failed)[-1].blueprint_id == ranked[0].blueprint_id


def _packet(seeds_health, epoch=4):
    health = [HealthSignal(seed_id=s.seed_id, index=s.index, epoch=epoch, state=S.DORMANT, activation_mean=0.0,
                           activation_variance=1.0, gradient_norm=1.0, dead_unit_ratio=0.0, health_score=score,
                           confidence=0.9, samples=10) for s, score in seeds_health]
    return SystemStatePacket(epoch=epoch, step=1, train_loss=1.0, health=tuple(health),
                             seeds=tuple(s for s, _ in seeds_health), adaptations_this_epoch=0)


def test_gradmax_placement_ranks_locations_by_score_not_health():
    scores = {"s0": 1.0, "s1": 5.0, "s2": 3.0}

    def rank(seed: Seed) -> list[Choice]:
        return [Choice("a" * 64, "x", scores[seed.seed_id], (), 10)]

    seeds = [(_seed(i=0), 0.1), (_seed(i=1), 0.9), (_seed(i=2), 0.95)]
    by_health = HeuristicPolicy(PolicyConfig(blueprint_choice="gradmax", health_threshold=0.3), 2, rank=rank)
    assert [s.seed_id for s in by_health.decide(_packet(seeds))] == ["s0"]
    placed = HeuristicPolicy(PolicyConfig(blueprint_choice="gradmax", placement="gradmax"), 2, rank=rank)
    assert [s.seed_id for s in placed.decide(_packet(seeds))] == ["s1", "s2"]
    with pytest.raises(ConfigError, match="only the embedded Tamiyo"):
        HeuristicPolicy(PolicyConfig(blueprint_choice="gradmax"), 2)


# --- the gradmax TRAINING objective ---------------------------------------------------------------------------------

def test_gradmax_training_keeps_the_output_zero_the_norm_fixed_and_the_host_gradients_unchanged(tmp_path):
    h = Harness(tmp_path, seed_objective="gradmax", training_epochs=2, freeze_host_in=())  # a live host
    try:
        h.run_epoch()
        bp = h.m.urza.template("residual_mlp", ("B", 8)).blueprint_id
        assert h.germinate(bp)
        while h.state() != S.TRAINING:
            h.run_epoch()
        r = h.m.kasmina.seeds["1"]
        assert r.slot.kernel is not None
        kernel = r.slot.kernel
        out = output_parameters(kernel)
        hidden = [p for p in kernel.parameters() if all(p is not q for q in out)]
        norm0 = float(torch.sqrt(sum(p.detach().pow(2).sum() for p in hidden)))
        x, y = h.x[:32], h.y[:32]
        # host gradients with the TRAINING seed equal those with the slot empty
        grads = []
        for keep in (True, False):
            saved = r.slot.kernel
            if not keep:
                r.slot.kernel = None
            h.m.model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(h.m.model(x), y).backward()
            grads.append([p.grad.clone() for p in h.m.model.host.parameters()])
            r.slot.kernel = saved
            r.slot.clear_capture()
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
        probe_x = h.x[:64]
        h.run_epoch()
        assert h.state() == S.TRAINING
        assert all(float(p.detach().abs().max()) == 0.0 for p in out)
        assert float(torch.sqrt(sum(p.detach().pow(2).sum() for p in hidden))) == pytest.approx(norm0, rel=1e-5)
        with torch.no_grad():
            assert float(kernel(probe_x @ torch.ones(4, 8)).abs().max()) == 0.0  # f ≡ 0: the host sees x exactly
        h.run_epoch()
        reason = r.life.history[-1].reason
        assert h.state() == S.GRAFTING and reason.startswith("gradmax score ")
        assert float(reason.split()[2]) > 0
    finally:
        h.close()


# --- config surface -------------------------------------------------------------------------------------------------

def test_a_decision_names_its_blueprint_by_library_id():
    from cambium.core.errors import ProtocolError
    from cambium.morph.contracts import AdaptationKind, AdaptationSignal, parse

    good = AdaptationSignal(kind=AdaptationKind.GERMINATE, seed_id="s0", blueprint_name="conv_bottleneck~ab12cd34",
                            blueprint_id="a" * 64, epoch=1)
    assert parse(AdaptationSignal, good.model_dump(mode="json")) == good
    with pytest.raises(ProtocolError, match="blueprint_id"):
        parse(AdaptationSignal, {**good.model_dump(mode="json"), "blueprint_id": "not-a-sha"})


def test_a_tamiyo_service_refuses_the_gradmax_choice_with_422(tmp_path):
    """A Tamiyo service has no seed slots to probe: a posted gradmax config is a 422, not a 500."""
    from fastapi.testclient import TestClient

    from cambium.morph.api import create_app
    from cambium.morph.bus import InProcessBus

    auth = {"Authorization": "Bearer t0k3n-growth"}
    with TestClient(create_app(Urza.local(tmp_path / "urza"), InProcessBus(), token="t0k3n-growth"),
                    headers=auth) as client:
        r = client.post("/policy/load", json={"kind": "heuristic", "config": {"blueprint_choice": "gradmax"}})
        assert r.status_code == 422 and "only the embedded Tamiyo" in r.json()["detail"], r.text
        assert client.get("/policy/status").json()["config"]["blueprint_choice"] == "cycle"


def test_policy_tag_and_placement_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown tag"):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ['policy.avoid_tags=["quick"]'])
    with pytest.raises(ConfigError, match=r"needs policy\.blueprint_choice=.gradmax."):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ["policy.placement=gradmax"])
    with pytest.raises(ConfigError, match="share"):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ['policy.avoid_tags=["slow"]', 'policy.prefer_tags=["slow"]'])
    with pytest.raises(ConfigError, match="arm's name"):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ['compare.variants={static=["train.lr=0.1"]}'])


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    avoid=st.lists(st.one_of(st.sampled_from(["slow", "risk_high", "large", "high_memory"]), _TEXT), max_size=3),
    prefer=st.lists(st.one_of(st.sampled_from(["fast", "risk_low", "small"]), _TEXT), max_size=3),
    choice=st.one_of(st.sampled_from(["cycle", "gradmax"]), _TEXT),
    placement=st.one_of(st.sampled_from(["health", "gradmax"]), _TEXT),
    max_params=st.one_of(st.integers(-5, 10**7), _TEXT),
    mutants=st.one_of(st.integers(-2, 20), st.floats(allow_nan=True)),
    variants=st.dictionaries(_TEXT, st.lists(_TEXT, max_size=3), max_size=3),
    objective=st.one_of(st.sampled_from(["reconstruction", "gradmax"]), _TEXT),
)
def test_fuzzed_growth_settings_load_or_fail_with_one_line(avoid, prefer, choice, placement, max_params, mutants,
                                                           variants, objective):
    data = {"policy": {"avoid_tags": avoid, "prefer_tags": prefer, "blueprint_choice": choice,
                       "placement": placement},
            "library": {"max_params": max_params, "mutants_per_blueprint": mutants},
            "lifecycle": {"seed_objective": objective}, "compare": {"variants": variants}}
    try:
        cfg = load_data(data, CONFIG_MODEL)
    except ConfigError as exc:
        assert str(exc).strip() and "Traceback" not in str(exc)
        return
    assert cfg.library.max_params >= 1 and 0 <= cfg.library.mutants_per_blueprint <= 16
    assert cfg.policy.placement != "gradmax" or cfg.policy.blueprint_choice == "gradmax"


# --- exact resume with everything of this file switched on ----------------------------------------------------------

GROWTH = ["policy.blueprint_choice=gradmax", "policy.placement=gradmax", "library.mutants_per_blueprint=1",
          "lifecycle.freeze_host_in=[]", "lifecycle.seed_objective=gradmax", "train.epochs=5", "data.limit=256"]


def test_a_gradmax_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """The catalog, the GradMax probe and the norm the gradmax objective keeps are rebuilt, not checkpointed: a run
    stopped after epoch 3 (seeds mid-lifecycle) and resumed still ends bit-identical to one never stopped."""
    from cambium.morph.train import train

    cfg = load("configs/morph/tiny.toml", CONFIG_MODEL, [f"library.root={tmp_path}/urza", *GROWTH])
    want = train(cfg, name="full", runs_root=tmp_path / "a", show_progress=False)
    states = [c["target"] for s in want["seeds"].values() for c in s["timeline"]]
    assert "TRAINING" in states and "GRAFTING" in states  # the gradmax TRAINING ran and passed its gate
    part = train(cfg, name="part", runs_root=tmp_path / "b", stop_after=3, show_progress=False)
    got = train(cfg, name="part", runs_root=tmp_path / "b", resume=part["run_id"], show_progress=False)
    skip = {"run_id", "tamiyo_latency_ms_median"}
    assert {k: v for k, v in got.items() if k not in skip} == {k: v for k, v in want.items() if k not in skip}
