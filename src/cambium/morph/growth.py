"""The GradMax growth criterion: how fast the task loss would fall if a new, zero-initialised unit were grown here.

A blueprint's kernel f starts with its output op zeroed (Tezzeret's `zero_init_output`), so grafting it leaves the
host's function unchanged: L(x + f(x)) = L(x). What differs between candidates is the gradient the task loss gives
the zeroed output parameters θ_out at that point,

    ∇_θout L = Σ_b,i g[b, i] · ∂f(x)[b, i]/∂θ_out,        g = ∂L/∂x at the slot (the batch-mean loss),

and one gradient step of size η on them lowers the loss by η‖∇_θout L‖² to first order. GradMax (Evci et al., 2022)
grows the units that maximise this norm; here it scores (location, blueprint) pairs: `gradmax_score` is
‖∇_θout L‖² computed from the slot's captured activation x and gradient g with one autograd call (the inner product
⟨f(x), g⟩ has exactly that gradient w.r.t. θ_out). tests/morph/test_growth.py checks it against a brute-force
central finite difference of the full host's loss over every output parameter on a tiny network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["gradmax_gradient", "gradmax_score", "output_parameters"]


def output_parameters(kernel: nn.Module) -> list[nn.Parameter]:
    """The parameters of a compiled blueprint's last parametrised op (the one zeroed at initialisation)."""
    ops = getattr(kernel, "ops", None)
    plan = getattr(kernel, "plan", None)
    if not isinstance(ops, nn.ModuleDict) or plan is None:
        raise TypeError(f"{type(kernel).__name__} is not a compiled blueprint (no IR plan)")
    last = [node_id for node_id, *_ in plan if node_id in ops]
    if not last:
        return []
    op = ops[last[-1]]
    # Self-attention zeroes only its output projection (`out`); its qkv projection is an inner, non-zero layer.
    out = getattr(op, "out", None)
    head: nn.Module = out if isinstance(out, nn.Module) else op
    return [p for p in head.parameters()]


def gradmax_gradient(kernel: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """∇_θout L for a kernel grafted as x + f(x) at a slot whose input is `x` and whose loss gradient is `grad`
    (the gradient of the loss the host trains on w.r.t. x, same shape); the kernel's parameters and buffers are left
    as they were."""
    params = output_parameters(kernel)
    if not params:
        return []
    if x.shape != grad.shape:
        raise ValueError(f"activation {list(x.shape)} and gradient {list(grad.shape)} differ in shape")
    was_training = kernel.training
    buffers = [(b, b.detach().clone()) for b in kernel.buffers()]
    kernel.train()  # the graft trains in training mode: batch statistics, as the host's step would see them
    try:
        with torch.enable_grad():
            inner = (kernel(x.detach()) * grad.detach()).sum()
            grads = torch.autograd.grad(inner, params, allow_unused=True)
    finally:
        kernel.train(was_training)
        with torch.no_grad():  # running statistics the forward moved are put back: scoring changes nothing
            for b, saved in buffers:
                b.copy_(saved)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]


def gradmax_score(kernel: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """‖∇_θout L‖²: the first-order loss decrease per unit learning rate of growing `kernel` at this slot."""
    return float(sum(g.double().pow(2).sum() for g in gradmax_gradient(kernel, x, grad)))
