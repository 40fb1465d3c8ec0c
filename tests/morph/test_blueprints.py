"""MOR-5: the IR library, the generated (compiled) forward against the interpreting reference, Karn's mutants."""

from __future__ import annotations

import random

import pytest
import torch

from cambium.morph.blueprints import TEMPLATES, make_blueprint
from cambium.morph.contracts import BlueprintIR, IRNode, OpKind
from cambium.morph.ir import BlueprintError, CompiledIRModule, build_module, infer_shapes, param_count
from cambium.morph.library import Urza
from cambium.morph.mutate import Karn, mutate

SHAPES = {"conv": ("B", 8, 6, 6), "tokens": ("B", "T", 8), "flat": ("B", 8)}
FITS = {
    "residual_mlp": ("tokens", "flat"),
    "conv_bottleneck": ("conv",),
    "squeeze_excitation": ("conv",),
    "low_rank_adapter": ("conv", "tokens", "flat"),
    "attention": ("conv", "tokens"),
}
CASES = [(name, layout) for name, layouts in FITS.items() for layout in layouts]


def _input(shape, dtype, batch=3, tokens=5):
    dims = [batch if d == "B" else tokens if d == "T" else d for d in shape]
    return torch.randn(dims, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)


def test_library_has_the_five_families():
    assert set(TEMPLATES) == set(FITS)


@pytest.mark.parametrize(("name", "layout"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_forward_matches_reference(name, layout, dtype):
    """Generated straight-line code vs the node-by-node interpreter: same outputs and gradients."""
    ir = make_blueprint(name, SHAPES[layout])
    ref = build_module(ir, seed=3, dtype=dtype, zero_init_output=False)
    fast = CompiledIRModule(ir, seed=3, dtype=dtype, zero_init_output=False)
    x1 = _input(SHAPES[layout], dtype)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ref(x1), fast(x2)
    assert y1.shape == x1.shape
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, rtol=0, atol=0)
    assert sum(p.numel() for p in fast.parameters()) == param_count(ir)


@pytest.mark.parametrize(("name", "layout"), CASES)
def test_zero_init_output_starts_at_zero_and_is_deterministic(name, layout):
    ir = make_blueprint(name, SHAPES[layout])
    x = _input(SHAPES[layout], torch.float32).detach()
    assert torch.count_nonzero(CompiledIRModule(ir, seed=0)(x)) == 0
    a, b = CompiledIRModule(ir, seed=5), CompiledIRModule(ir, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    state = torch.get_rng_state()
    CompiledIRModule(ir, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never touched


def test_wrong_layout_and_bad_graphs_are_rejected():
    with pytest.raises(BlueprintError, match="does not fit"):
        make_blueprint("conv_bottleneck", ("B", 8))
    bad = BlueprintIR(
        input_shape=("B", 8),
        nodes=(IRNode(id="a", op=OpKind.LINEAR, inputs=("x",), attrs={"in_features": 8, "out_features": 4},
                      shape=("B", 4)),),
        output="a",
    )
    with pytest.raises(BlueprintError, match="residual must have the input shape"):
        infer_shapes(bad)
    lying = BlueprintIR(
        input_shape=("B", 8),
        nodes=(IRNode(id="a", op=OpKind.RELU, inputs=("x",), shape=("B", 9)),),
        output="a",
    )
    with pytest.raises(BlueprintError, match="declares shape"):
        infer_shapes(lying)
    wrong_attr = BlueprintIR(
        input_shape=("B", 8),
        nodes=(IRNode(id="a", op=OpKind.LINEAR, inputs=("x",), attrs={"in_features": 7, "out_features": 8},
                      shape=("B", 8)),),
        output="a",
    )
    with pytest.raises(BlueprintError, match="in_features=7"):
        infer_shapes(wrong_attr)


def test_karn_mutants_are_valid_and_within_limits(tmp_path):
    urza = Urza.local(tmp_path)
    karn = Karn(urza, seed=0, max_params=2_000)
    seen = 0
    for name, layout in CASES:
        parent = urza.template(name, SHAPES[layout])
        child = karn.propose(parent)
        if child is None:
            continue
        seen += 1
        infer_shapes(child.ir)
        assert child.parent_id == parent.blueprint_id and child.family == parent.family
        assert child.blueprint_id != parent.blueprint_id
        assert 0 < child.param_count <= 2_000
        x = _input(SHAPES[layout], torch.float32).detach()
        assert CompiledIRModule(child.ir, zero_init_output=False)(x).shape == x.shape
    assert seen >= 4
    # A budget below every mutant yields nothing rather than an oversized blueprint.
    big = make_blueprint("conv_bottleneck", SHAPES["conv"])
    assert mutate(big, random.Random(0), max_params=10) is None
