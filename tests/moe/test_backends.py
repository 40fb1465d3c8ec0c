"""Expert backends against the per-expert loop reference (MOE-4): outputs and gradients (input, gate weights, expert
weights) over a small grid of shapes, loads (balanced, skewed, experts with no rows) and dtypes."""

from __future__ import annotations

import pytest
import torch

from cambium.nn.moe import MoE, RouterOutput, moe_reference
from cambium.nn.moe_experts import combine, dispatch, expert_compute, plan_dispatch


def _routing(n: int, e: int, k: int, skew: float, gen: torch.Generator) -> RouterOutput:
    logits = torch.randn(n, e, generator=gen) + skew * torch.linspace(0, 1, e)  # skew piles rows on the last ones
    scores = logits.sigmoid()
    indices = scores.topk(k, dim=-1).indices
    weights = scores.gather(1, indices)
    return RouterOutput((weights / weights.sum(-1, keepdim=True)).requires_grad_(), indices, scores, logits)


def _grads(backend: str, x: torch.Tensor, routing: RouterOutput, w13: torch.Tensor, w2: torch.Tensor,
           grad: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (x, routing.weights, w13, w2)]
    xi, wi, w13i, w2i = leaves
    r = RouterOutput(wi, routing.indices, routing.scores, routing.logits)
    if backend == "loop":
        out = moe_reference(xi, r, w13i, w2i)
    else:
        plan = plan_dispatch(r.indices, w13.shape[0])
        out = combine(expert_compute(dispatch(xi, plan), plan.counts, w13i, w2i, backend), wi, plan)  # type: ignore[arg-type]
    out.backward(grad)
    return [out.detach(), *(t.grad for t in leaves if t.grad is not None)]


@pytest.mark.parametrize("backend", ["padded_bmm", "segmented"])
@pytest.mark.parametrize(("n", "e", "k", "skew"), [(64, 8, 2, 0.0), (50, 16, 4, 6.0), (7, 8, 1, 20.0)])
def test_backend_equals_the_loop_reference_outputs_and_gradients(backend: str, n: int, e: int, k: int,
                                                                 skew: float) -> None:
    gen = torch.Generator().manual_seed(n + e)
    d, h = 12, 10
    x, grad = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    w13, w2 = torch.randn(e, d, 2 * h, generator=gen) / d**0.5, torch.randn(e, h, d, generator=gen) / h**0.5
    routing = _routing(n, e, k, skew, gen)
    if skew >= 20:  # some experts get no rows at all
        assert int((torch.bincount(routing.indices.flatten(), minlength=e) == 0).sum()) > 0
    ref = _grads("loop", x, routing, w13, w2, grad)
    got = _grads(backend, x, routing, w13, w2, grad)
    assert len(got) == len(ref) == 5
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segmented_layer_equals_padded_bmm_in_a_full_moe_forward_and_backward() -> None:
    torch.manual_seed(0)
    a = MoE(16, 8, 2, 8, n_shared_experts=1, backend="padded_bmm")
    b = MoE(16, 8, 2, 8, n_shared_experts=1, backend="segmented")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 10, 16)
    ya, yb = a(x)[0], b(x)[0]
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=name)
