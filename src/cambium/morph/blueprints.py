"""The blueprint templates of the Urza library, written as IR for a given activation shape.

Every blueprint computes a residual f(x) of the input's shape; the slot adds α f(x). With the default
`zero_init_output`, Tezzeret zeroes the last parametrised op so f ≡ 0 when a seed starts.

| name               | layouts                 | graph                                                           |
|--------------------|-------------------------|-----------------------------------------------------------------|
| residual_mlp       | [B, D], [B, T, D]       | linear D→h, GELU, linear h→D                                    |
| conv_bottleneck    | [B, C, H, W]            | 1×1 C→c, BN, ReLU, 3×3 c→c, BN, ReLU, 1×1 c→C                   |
| squeeze_excitation | [B, C, H, W]            | x · tanh(1×1(ReLU(1×1(avgpool x))))                             |
| low_rank_adapter   | [B, D], [B, T, D], 4-D* | linear D→r, linear r→D (no bias); *4-D as 1×1 convs             |
| attention          | [B, T, D], [B, C, H, W] | LayerNorm, multi-head self-attention (over H·W tokens for 4-D)  |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cambium.morph.contracts import BlueprintIR, IRNode, OpKind
from cambium.morph.ir import BlueprintError, infer_shapes, output_shape

__all__ = ["TEMPLATES", "make_blueprint"]

Shape = tuple[int | str, ...]


class _Graph:
    """Appends nodes, inferring each declared shape with the IR's own rules."""

    def __init__(self, input_shape: Shape) -> None:
        self.input_shape = input_shape
        self.nodes: list[IRNode] = []
        self.shapes: dict[str, Shape] = {"x": input_shape}

    def add(self, node_id: str, op: OpKind, inputs: tuple[str, ...], **attrs: Any) -> str:
        probe = IRNode(id=node_id, op=op, inputs=inputs, attrs=attrs, shape=())
        shape = output_shape(probe, [self.shapes[i] for i in inputs])
        self.nodes.append(probe.model_copy(update={"shape": shape}))
        self.shapes[node_id] = shape
        return node_id

    def build(self, output: str) -> BlueprintIR:
        ir = BlueprintIR(input_shape=self.input_shape, nodes=tuple(self.nodes), output=output)  # type: ignore[arg-type]
        infer_shapes(ir)
        return ir


def _layout(shape: Shape) -> str:
    return {2: "flat", 3: "tokens", 4: "conv"}.get(len(shape), "other")


def _need(name: str, shape: Shape, layouts: tuple[str, ...]) -> None:
    if _layout(shape) not in layouts:
        raise BlueprintError(f"blueprint {name!r} does not fit a {list(shape)} activation (supports {layouts})")


def residual_mlp(shape: Shape, hidden_ratio: int = 2) -> BlueprintIR:
    _need("residual_mlp", shape, ("flat", "tokens"))
    d = int(shape[-1])
    g = _Graph(shape)
    g.add("up", OpKind.LINEAR, ("x",), in_features=d, out_features=hidden_ratio * d)
    g.add("act", OpKind.GELU, ("up",))
    return g.build(g.add("down", OpKind.LINEAR, ("act",), in_features=hidden_ratio * d, out_features=d))


def conv_bottleneck(shape: Shape, reduction: int = 2) -> BlueprintIR:
    _need("conv_bottleneck", shape, ("conv",))
    c = int(shape[1])
    m = max(c // reduction, 4)
    g = _Graph(shape)
    g.add("reduce", OpKind.CONV2D, ("x",), in_channels=c, out_channels=m, kernel_size=1)
    g.add("bn1", OpKind.BATCHNORM2D, ("reduce",), num_features=m)
    g.add("act1", OpKind.RELU, ("bn1",))
    g.add("conv", OpKind.CONV2D, ("act1",), in_channels=m, out_channels=m, kernel_size=3)
    g.add("bn2", OpKind.BATCHNORM2D, ("conv",), num_features=m)
    g.add("act2", OpKind.RELU, ("bn2",))
    return g.build(g.add("expand", OpKind.CONV2D, ("act2",), in_channels=m, out_channels=c, kernel_size=1))


def squeeze_excitation(shape: Shape, reduction: int = 4) -> BlueprintIR:
    _need("squeeze_excitation", shape, ("conv",))
    c = int(shape[1])
    m = max(c // reduction, 2)
    g = _Graph(shape)
    g.add("pool", OpKind.GLOBAL_AVG_POOL, ("x",))
    g.add("fc1", OpKind.CONV2D, ("pool",), in_channels=c, out_channels=m, kernel_size=1)
    g.add("act", OpKind.RELU, ("fc1",))
    g.add("fc2", OpKind.CONV2D, ("act",), in_channels=m, out_channels=c, kernel_size=1)
    g.add("gate", OpKind.TANH, ("fc2",))
    return g.build(g.add("excite", OpKind.MUL, ("x", "gate")))


def low_rank_adapter(shape: Shape, rank: int = 4) -> BlueprintIR:
    _need("low_rank_adapter", shape, ("flat", "tokens", "conv"))
    g = _Graph(shape)
    if _layout(shape) == "conv":
        c = int(shape[1])
        g.add("down", OpKind.CONV2D, ("x",), in_channels=c, out_channels=rank, kernel_size=1, bias=False)
        return g.build(g.add("up", OpKind.CONV2D, ("down",), in_channels=rank, out_channels=c, kernel_size=1,
                             bias=False))
    d = int(shape[-1])
    g.add("down", OpKind.LINEAR, ("x",), in_features=d, out_features=rank, bias=False)
    return g.build(g.add("up", OpKind.LINEAR, ("down",), in_features=rank, out_features=d, bias=False))


def attention(shape: Shape, heads: int = 2) -> BlueprintIR:
    _need("attention", shape, ("tokens", "conv"))
    g = _Graph(shape)
    if _layout(shape) == "conv":
        c, h, w = int(shape[1]), int(shape[2]), int(shape[3])
        g.add("tokens", OpKind.TO_TOKENS, ("x",))
        g.add("norm", OpKind.LAYERNORM, ("tokens",), dim=c)
        g.add("attn", OpKind.SELF_ATTENTION, ("norm",), dim=c, heads=heads)
        return g.build(g.add("image", OpKind.FROM_TOKENS, ("attn",), height=h, width=w))
    d = int(shape[-1])
    g.add("norm", OpKind.LAYERNORM, ("x",), dim=d)
    return g.build(g.add("attn", OpKind.SELF_ATTENTION, ("norm",), dim=d, heads=heads))


TEMPLATES: dict[str, Callable[[Shape], BlueprintIR]] = {
    "residual_mlp": residual_mlp,
    "conv_bottleneck": conv_bottleneck,
    "squeeze_excitation": squeeze_excitation,
    "low_rank_adapter": low_rank_adapter,
    "attention": attention,
}


def make_blueprint(name: str, shape: Shape) -> BlueprintIR:
    """The IR of template `name` for an activation of `shape` (batch dim "B")."""
    if name not in TEMPLATES:
        raise BlueprintError(f"unknown blueprint {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name](shape)
