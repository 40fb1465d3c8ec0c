"""Karn, the blueprint generator: new blueprints by mutating IRs, kept within a parameter budget.

Mutations (each keeps the graph's input and output shapes; shapes are re-inferred and checked):
- `swap_activation`: a relu ↔ gelu node changes op;
- `resize`: the output width of an internal linear/conv node is scaled by 1/2 or 2, and every node on its
  single-consumer chain of shape-preserving ops (activations, norms, scale) up to the next linear/conv is resized
  with it (that consumer's input width follows).
A mutant is accepted if `infer_shapes` passes, its parameter count is in [1, max_params], and it differs from the
parent. Randomness comes from a private `random.Random(seed)`.
"""

from __future__ import annotations

import random

from cambium.morph.contracts import Blueprint, BlueprintIR, IRNode, OpKind
from cambium.morph.ir import BlueprintError, infer_shapes, output_shape, param_count
from cambium.morph.library import Urza

__all__ = ["Karn", "mutate"]

_WIDTH_OUT = {OpKind.LINEAR: "out_features", OpKind.CONV2D: "out_channels"}
_WIDTH_IN = {OpKind.LINEAR: "in_features", OpKind.CONV2D: "in_channels"}
_CARRY = {OpKind.RELU: None, OpKind.GELU: None, OpKind.TANH: None, OpKind.SIGMOID: None, OpKind.SCALE: None,
          OpKind.BATCHNORM2D: "num_features", OpKind.LAYERNORM: "dim"}


def _consumers(ir: BlueprintIR, node_id: str) -> list[IRNode]:
    return [n for n in ir.nodes if node_id in n.inputs]


def _reshape(ir: BlueprintIR, nodes: list[IRNode]) -> BlueprintIR:
    """Rebuild `nodes` with re-inferred shapes."""
    shapes: dict[str, tuple[int | str, ...]] = {"x": tuple(ir.input_shape)}
    out = []
    for n in nodes:
        shape = output_shape(n, [shapes[i] for i in n.inputs])
        shapes[n.id] = shape
        out.append(n.model_copy(update={"shape": shape}))
    mutant = BlueprintIR(input_shape=ir.input_shape, nodes=tuple(out), output=ir.output)
    infer_shapes(mutant)
    return mutant


def _swap_activation(ir: BlueprintIR, rng: random.Random) -> BlueprintIR | None:
    acts = [i for i, n in enumerate(ir.nodes) if n.op in (OpKind.RELU, OpKind.GELU)]
    if not acts:
        return None
    i = rng.choice(acts)
    nodes = list(ir.nodes)
    nodes[i] = nodes[i].model_copy(update={"op": OpKind.GELU if nodes[i].op == OpKind.RELU else OpKind.RELU})
    return _reshape(ir, nodes)


def _resize(ir: BlueprintIR, rng: random.Random) -> BlueprintIR | None:
    candidates = []
    for n in ir.nodes:
        if n.op not in _WIDTH_OUT or n.id == ir.output:
            continue
        chain: list[IRNode] = []
        cur = n
        while True:
            cons = _consumers(ir, cur.id)
            if len(cons) != 1:
                break
            nxt = cons[0]
            if nxt.op in _WIDTH_IN and len(nxt.inputs) == 1 and int(nxt.attrs.get("groups", 1)) == 1:
                candidates.append((n, chain, nxt))
                break
            if nxt.op not in _CARRY:
                break
            chain.append(nxt)
            cur = nxt
    if not candidates:
        return None
    head, chain, tail = rng.choice(candidates)
    width = int(head.attrs[_WIDTH_OUT[head.op]])
    new = max(1, width // 2) if rng.random() < 0.5 else width * 2
    if new == width:
        return None
    by_id = {head.id: {_WIDTH_OUT[head.op]: new}, tail.id: {_WIDTH_IN[tail.op]: new}}
    for c in chain:
        key = _CARRY[c.op]
        if key is not None:
            by_id[c.id] = {key: new}
    nodes = [n.model_copy(update={"attrs": {**n.attrs, **by_id[n.id]}}) if n.id in by_id else n for n in ir.nodes]
    return _reshape(ir, nodes)


def mutate(ir: BlueprintIR, rng: random.Random, max_params: int, attempts: int = 8) -> BlueprintIR | None:
    """A valid mutant of `ir` within `max_params`, or None if `attempts` tries found none."""
    for _ in range(attempts):
        op = rng.choice((_swap_activation, _resize))
        try:
            mutant = op(ir, rng)
        except BlueprintError:
            continue
        if mutant is not None and mutant.ir_hash() != ir.ir_hash() and 0 < param_count(mutant) <= max_params:
            return mutant
    return None


class Karn:
    """Proposes mutants of library blueprints and files them in Urza as PROPOSED."""

    def __init__(self, urza: Urza, *, seed: int = 0, max_params: int = 200_000) -> None:
        self.urza = urza
        self.rng = random.Random(seed)
        self.max_params = max_params

    def propose(self, parent: Blueprint) -> Blueprint | None:
        mutant = mutate(parent.ir, self.rng, self.max_params)
        if mutant is None:
            return None
        return self.urza.add_blueprint(
            f"{parent.family}~{mutant.ir_hash()[:8]}", parent.family, mutant, parent_id=parent.blueprint_id
        )
