"""Blueprint IR semantics: shape inference, parameter counts, and the module that executes a graph.

Each op has a shape rule (input shapes + attrs → output shape, raising BlueprintError with the node id) and, if it
has parameters, a module. Parameters are initialised from a private `torch.Generator`, never the global RNG: Tezzeret
builds modules in a background thread, and touching the global generator there would change the training run's
random stream.

Shapes: tuples of ints and the symbols "B", "T". Binary ops broadcast (equal dims, or 1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cambium.core.errors import ProtocolError
from cambium.morph.contracts import BlueprintIR, IRNode, OpKind

__all__ = [
    "BlueprintError",
    "CompiledIRModule",
    "IRModule",
    "activation_elements",
    "build_module",
    "generate_source",
    "infer_shapes",
    "output_shape",
    "param_count",
]

Shape = tuple[int | str, ...]
PARAMETRISED = {OpKind.LINEAR, OpKind.CONV2D, OpKind.BATCHNORM2D, OpKind.LAYERNORM, OpKind.SELF_ATTENTION}


class BlueprintError(ProtocolError):
    """A blueprint graph is inconsistent (shape mismatch, bad attribute) or cannot be compiled."""


def _attr(node: IRNode, name: str, kind: type, default: Any = None) -> Any:
    value = node.attrs.get(name, default)
    if value is None:
        raise BlueprintError(f"node {node.id!r} ({node.op.value}) needs attribute {name!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BlueprintError(f"node {node.id!r}: attribute {name}={value!r} must be {kind.__name__}")
    if kind is int and isinstance(value, int) and value <= 0 and name not in ("padding",):
        raise BlueprintError(f"node {node.id!r}: attribute {name}={value} must be > 0")
    return value


def _broadcast(node: IRNode, a: Shape, b: Shape) -> Shape:
    if len(a) != len(b):
        raise BlueprintError(f"node {node.id!r}: cannot broadcast {list(a)} with {list(b)} (ranks differ)")
    out: list[int | str] = []
    for x, y in zip(a, b, strict=True):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise BlueprintError(f"node {node.id!r}: cannot broadcast {list(a)} with {list(b)}")
    return tuple(out)


def output_shape(node: IRNode, ins: list[Shape]) -> Shape:
    """Output shape of `node` given its input shapes; BlueprintError if they do not fit."""
    op = node.op
    arity = 2 if op in (OpKind.ADD, OpKind.SUB, OpKind.MUL) else 1
    if len(ins) != arity:
        raise BlueprintError(f"node {node.id!r} ({op.value}) takes {arity} input(s), got {len(ins)}")
    x = ins[0]
    if op in (OpKind.RELU, OpKind.GELU, OpKind.SIGMOID, OpKind.TANH, OpKind.SCALE):
        if op == OpKind.SCALE:
            _attr(node, "factor", float)
        return x
    if op in (OpKind.ADD, OpKind.SUB, OpKind.MUL):
        return _broadcast(node, x, ins[1])
    if op == OpKind.LINEAR:
        n_in, n_out = _attr(node, "in_features", int), _attr(node, "out_features", int)
        if x[-1] != n_in:
            raise BlueprintError(f"node {node.id!r}: linear in_features={n_in} but input is {list(x)}")
        return (*x[:-1], n_out)
    if op == OpKind.LAYERNORM:
        if x[-1] != _attr(node, "dim", int):
            raise BlueprintError(f"node {node.id!r}: layernorm dim={node.attrs.get('dim')} but input is {list(x)}")
        return x
    if len(x) != 4 and op in (OpKind.CONV2D, OpKind.BATCHNORM2D, OpKind.GLOBAL_AVG_POOL, OpKind.TO_TOKENS):
        raise BlueprintError(f"node {node.id!r} ({op.value}) needs a [B, C, H, W] input, got {list(x)}")
    if op == OpKind.CONV2D:
        c_in, c_out = _attr(node, "in_channels", int), _attr(node, "out_channels", int)
        k = _attr(node, "kernel_size", int)
        pad = node.attrs.get("padding", k // 2)
        groups = _attr(node, "groups", int, 1)
        if x[1] != c_in or c_in % groups or c_out % groups or not isinstance(pad, int) or pad < 0:
            raise BlueprintError(f"node {node.id!r}: conv2d attrs {node.attrs} do not fit input {list(x)}")
        h, w = x[2], x[3]
        if not isinstance(h, int) or not isinstance(w, int):
            raise BlueprintError(f"node {node.id!r}: conv2d needs concrete H, W, got {list(x)}")
        return (x[0], c_out, h + 2 * pad - k + 1, w + 2 * pad - k + 1)
    if op == OpKind.BATCHNORM2D:
        if x[1] != _attr(node, "num_features", int):
            raise BlueprintError(f"node {node.id!r}: batchnorm2d num_features does not match input {list(x)}")
        return x
    if op == OpKind.GLOBAL_AVG_POOL:
        return (x[0], x[1], 1, 1)
    if op == OpKind.TO_TOKENS:
        if not isinstance(x[2], int) or not isinstance(x[3], int):
            raise BlueprintError(f"node {node.id!r}: to_tokens needs concrete H, W, got {list(x)}")
        return (x[0], x[2] * x[3], x[1])
    if op == OpKind.FROM_TOKENS:
        h, w = _attr(node, "height", int), _attr(node, "width", int)
        if len(x) != 3 or x[1] != h * w:
            raise BlueprintError(f"node {node.id!r}: from_tokens {h}×{w} does not fit input {list(x)}")
        return (x[0], x[2], h, w)
    if op == OpKind.SELF_ATTENTION:
        dim, heads = _attr(node, "dim", int), _attr(node, "heads", int)
        if len(x) != 3 or x[2] != dim or dim % heads:
            raise BlueprintError(f"node {node.id!r}: self_attention dim={dim} heads={heads} vs input {list(x)}")
        return x
    raise BlueprintError(f"node {node.id!r}: op {op.value!r} has no shape rule")  # pragma: no cover


def infer_shapes(ir: BlueprintIR) -> dict[str, Shape]:
    """Shape of every value; raises BlueprintError if a node's declared shape or the output shape is wrong."""
    shapes: dict[str, Shape] = {"x": tuple(ir.input_shape)}
    for node in ir.nodes:
        got = output_shape(node, [shapes[i] for i in node.inputs])
        if tuple(node.shape) != got:
            raise BlueprintError(f"node {node.id!r} declares shape {list(node.shape)} but computes {list(got)}")
        shapes[node.id] = got
    if shapes[ir.output] != shapes["x"]:
        raise BlueprintError(
            f"output {ir.output!r} has shape {list(shapes[ir.output])}; a blueprint's residual must have the "
            f"input shape {list(ir.input_shape)}"
        )
    return shapes


def _uniform(gen: torch.Generator, shape: tuple[int, ...], fan_in: int, dtype: torch.dtype) -> nn.Parameter:
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return nn.Parameter(torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=gen))


class _Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _uniform(gen, (n_out, n_in), n_in, dtype)
        self.bias = _uniform(gen, (n_out,), n_in, dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def zero_output(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()


class _Conv2d(nn.Module):
    def __init__(self, node: IRNode, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        c_in, c_out, k = node.attrs["in_channels"], node.attrs["out_channels"], node.attrs["kernel_size"]
        assert isinstance(c_in, int) and isinstance(c_out, int) and isinstance(k, int)
        groups = int(node.attrs.get("groups", 1))
        self.padding = int(node.attrs.get("padding", k // 2))
        self.groups = groups
        fan_in = c_in // groups * k * k
        self.weight = _uniform(gen, (c_out, c_in // groups, k, k), fan_in, dtype)
        self.bias = _uniform(gen, (c_out,), fan_in, dtype) if node.attrs.get("bias", True) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=self.groups)

    zero_output = _Linear.zero_output


class _SelfAttention(nn.Module):
    """Multi-head self-attention over `[B, T, D]` with fused qkv and an output projection."""

    def __init__(self, dim: int, heads: int, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = _Linear(dim, 3 * dim, True, gen, dtype)
        self.out = _Linear(dim, dim, True, gen, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))

    def zero_output(self) -> None:
        self.out.zero_output()


def _make(node: IRNode, gen: torch.Generator, dtype: torch.dtype) -> nn.Module:
    a = node.attrs
    if node.op == OpKind.LINEAR:
        return _Linear(int(a["in_features"]), int(a["out_features"]), bool(a.get("bias", True)), gen, dtype)
    if node.op == OpKind.CONV2D:
        return _Conv2d(node, gen, dtype)
    if node.op == OpKind.BATCHNORM2D:
        return nn.BatchNorm2d(int(a["num_features"]), dtype=dtype)
    if node.op == OpKind.LAYERNORM:
        return nn.LayerNorm(int(a["dim"]), dtype=dtype)
    return _SelfAttention(int(a["dim"]), int(a["heads"]), gen, dtype)


class IRModule(nn.Module):
    """Runs a BlueprintIR: x `[*input_shape]` → residual f(x) of the same shape.

    `forward` walks the node list: the slow reference of CompiledIRModule.
    """

    def __init__(self, ir: BlueprintIR, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 zero_init_output: bool = True) -> None:
        super().__init__()
        infer_shapes(ir)
        self.plan: list[tuple[str, str, tuple[str, ...], float, tuple[int, int]]] = []
        gen = torch.Generator().manual_seed(seed)
        self.ops = nn.ModuleDict()
        last: nn.Module | None = None
        for node in ir.nodes:
            factor = float(node.attrs.get("factor", 1.0)) if node.op == OpKind.SCALE else 1.0
            hw = (
                (int(node.attrs["height"]), int(node.attrs["width"])) if node.op == OpKind.FROM_TOKENS else (0, 0)
            )
            self.plan.append((node.id, node.op.value, tuple(node.inputs), factor, hw))
            if node.op in PARAMETRISED:
                self.ops[node.id] = _make(node, gen, dtype)
                last = self.ops[node.id]
        self.output = ir.output
        if zero_init_output and last is not None:
            zero = getattr(last, "zero_output", None)
            if zero is not None:
                zero()
            else:
                with torch.no_grad():
                    for p in last.parameters():
                        p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {"x": x}
        for node_id, op, inputs, factor, hw in self.plan:
            a = env[inputs[0]]
            if node_id in self.ops:
                env[node_id] = self.ops[node_id](a)
            elif op == "relu":
                env[node_id] = F.relu(a)
            elif op == "gelu":
                env[node_id] = F.gelu(a)
            elif op == "sigmoid":
                env[node_id] = torch.sigmoid(a)
            elif op == "tanh":
                env[node_id] = torch.tanh(a)
            elif op == "scale":
                env[node_id] = a * factor
            elif op == "add":
                env[node_id] = a + env[inputs[1]]
            elif op == "sub":
                env[node_id] = a - env[inputs[1]]
            elif op == "mul":
                env[node_id] = a * env[inputs[1]]
            elif op == "global_avg_pool":
                env[node_id] = a.mean(dim=(2, 3), keepdim=True)
            elif op == "to_tokens":
                env[node_id] = a.flatten(2).transpose(1, 2)
            elif op == "from_tokens":
                env[node_id] = a.transpose(1, 2).unflatten(2, hw)
            else:  # pragma: no cover - the contract's OpKind enum and this table are kept in step by tests
                raise BlueprintError(f"op {op!r} has no implementation")
        return env[self.output]


def build_module(ir: BlueprintIR, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 zero_init_output: bool = True) -> IRModule:
    """An IRModule (the interpreting reference) with deterministic parameters for `seed`."""
    return IRModule(ir, seed=seed, dtype=dtype, zero_init_output=zero_init_output)


_EXPR = {
    "relu": "F.relu({0})",
    "gelu": "F.gelu({0})",
    "sigmoid": "torch.sigmoid({0})",
    "tanh": "torch.tanh({0})",
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "global_avg_pool": "{0}.mean(dim=(2, 3), keepdim=True)",
    "to_tokens": "{0}.flatten(2).transpose(1, 2)",
}


def generate_source(ir: BlueprintIR) -> str:
    """Straight-line Python source of the graph's forward (variables `v_<node id>`; ids are [a-z_][a-z0-9_]*)."""
    infer_shapes(ir)
    lines = ["def forward(self, x):", "    v_x = x"]
    for node in ir.nodes:
        args = [f"v_{i}" for i in node.inputs]
        if node.op in PARAMETRISED:
            expr = f"self.ops[{node.id!r}]({args[0]})"
        elif node.op == OpKind.SCALE:
            expr = f"{args[0]} * {float(node.attrs['factor'])!r}"
        elif node.op == OpKind.FROM_TOKENS:
            expr = f"{args[0]}.transpose(1, 2).unflatten(2, ({int(node.attrs['height'])}, {int(node.attrs['width'])}))"
        else:
            expr = _EXPR[node.op.value].format(*args)
        lines.append(f"    v_{node.id} = {expr}")
    lines.append(f"    return v_{ir.output}")
    return "\n".join(lines) + "\n"


class CompiledIRModule(IRModule):
    """The same parameters as IRModule, with `forward` generated as straight-line code (no per-node dispatch).

    The source is always regenerated from a validated IR, never read from a file.
    """

    def __init__(self, ir: BlueprintIR, **kwargs: Any) -> None:
        super().__init__(ir, **kwargs)
        self.source = generate_source(ir)
        namespace: dict[str, Any] = {"F": F, "torch": torch}
        exec(compile(self.source, f"<blueprint {ir.ir_hash()[:12]}>", "exec"), namespace)
        self._forward = namespace["forward"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(self, x)


def param_count(ir: BlueprintIR) -> int:
    """Trainable parameters of the compiled module, from attributes alone."""
    total = 0
    for node in ir.nodes:
        a = node.attrs
        if node.op == OpKind.LINEAR:
            total += int(a["in_features"]) * int(a["out_features"]) + (int(a["out_features"]) if a.get("bias", True)
                                                                        else 0)
        elif node.op == OpKind.CONV2D:
            k, groups = int(a["kernel_size"]), int(a.get("groups", 1))
            c_out = int(a["out_channels"])
            total += c_out * int(a["in_channels"]) // groups * k * k + (c_out if a.get("bias", True) else 0)
        elif node.op == OpKind.BATCHNORM2D:
            total += 2 * int(a["num_features"])
        elif node.op == OpKind.LAYERNORM:
            total += 2 * int(a["dim"])
        elif node.op == OpKind.SELF_ATTENTION:
            d = int(a["dim"])
            total += 4 * d * d + 4 * d
    return total


def activation_elements(ir: BlueprintIR, batch: int, tokens: int = 1) -> int:
    """Elements of every intermediate value for one forward at batch size `batch` (memory estimate)."""
    total = 0
    for shape in infer_shapes(ir).values():
        total += math.prod(batch if d == "B" else tokens if d == "T" else int(d) for d in shape)
    return total
