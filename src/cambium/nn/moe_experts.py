"""Routed expert compute for the mixture-of-experts layer (`cambium.nn.moe`): dispatch, grouped expert compute,
combine, and the expert-parallel form of the middle step.

Legend: N tokens (B·T flattened), D model width, E routed experts, K experts per token, H expert hidden width,
S = N·K routed (token, slot) rows.

  1. `plan_dispatch` + `dispatch`: sort the S rows by expert → `[S, D]` plus per-expert counts `[E]`;
  2. `expert_compute`: SwiGLU per expert over contiguous row groups (grouped matmul, padded batched matmul, or one
     matmul per expert segment) — or `expert_parallel`: the sorted rows travel to the rank owning their expert
     (differentiable all-to-all), are computed there and come back in the same order;
  3. `combine`: unsort and sum each token's K outputs weighted by its gate weights (gate gradients flow here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from cambium.core.errors import DeviceError
from cambium.nn.lowp import LowPrecision, fake_quantize

__all__ = [
    "Backend",
    "DispatchPlan",
    "ExpertShard",
    "combine",
    "dispatch",
    "expert_compute",
    "expert_parallel",
    "grouped_mm_unsupported_reason",
    "plan_dispatch",
    "resolve_backend",
    "swiglu_halves",
]

Backend = Literal["auto", "grouped_mm", "padded_bmm", "segmented", "loop"]

@dataclass(frozen=True)
class DispatchPlan:
    """How the S = N·K (token, slot) rows are ordered by expert.

    order `[S]`: flat slot ids (token·K + k) sorted by expert (stable); token_index `[S]`: the token of each sorted row;
    inverse `[S]`: position of each flat slot id in the sorted order; counts `[E]` int64: rows per expert.
    """

    order: torch.Tensor
    token_index: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor
    top_k: int


def plan_dispatch(indices: torch.Tensor, n_experts: int) -> DispatchPlan:
    """indices `[N, K]` → the sort of the N·K rows by expert."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=n_experts)
    return DispatchPlan(order, order // indices.shape[1], inverse, counts, indices.shape[1])


def _take(x: torch.Tensor, index: torch.Tensor, zero_row: bool) -> torch.Tensor:
    """x[index] along dim 0; with `zero_row`, index == len(x) selects a row of zeros."""
    if zero_row:
        x = torch.cat((x, x.new_zeros(1, *x.shape[1:])))
    return x.index_select(0, index)


class _GatherRows(torch.autograd.Function):
    """out = x[index] with a gather-only backward: grad_x[r] = Σ_j grad_out[back[r·k + j]].

    The caller guarantees that `back` lists, for every row r of x, the k positions of out that copy it (or the
    sentinel len(out) for "none", with `back_zero_row`). index_select's own backward is a scatter-add, which on
    CPU runs several times slower than this gather.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor, index: torch.Tensor, back: torch.Tensor, k: int, zero_row: bool, back_zero_row: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.k, ctx.n, ctx.back_zero_row = k, x.shape[0], back_zero_row  # type: ignore[attr-defined]
        return _take(x, index, zero_row)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (back,) = ctx.saved_tensors  # type: ignore[attr-defined]
        g = _take(grad.contiguous(), back, ctx.back_zero_row)  # type: ignore[attr-defined]
        if ctx.k > 1:  # type: ignore[attr-defined]
            g = g.view(ctx.n, ctx.k, *grad.shape[1:]).sum(1)  # type: ignore[attr-defined]
        return g, None, None, None, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects the
    stride-0 gradients that e.g. `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """x `[N, D]` → rows sorted by expert `[S, D]` (each token repeated once per chosen expert)."""
    out: torch.Tensor = _GatherRows.apply(x, plan.token_index, plan.inverse, plan.top_k, False, False)
    return out


def combine(y_sorted: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Expert outputs `[S, D]` in sorted order and gate weights `[N, K]` → `[N, D]` = Σ_k w[n, k]·y[n, k]."""
    n, k = weights.shape
    y: torch.Tensor = _GatherRows.apply(y_sorted, plan.inverse, plan.order, 1, False, False)
    return torch.bmm(weights[:, None, :].to(y.dtype), y.view(n, k, -1)).squeeze(1)


_GROUPED_MM_PROBE: dict[tuple[str, int | None, torch.dtype], str | None] = {}


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


def grouped_mm_unsupported_reason(device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> str | None:
    """None when the running torch can do a grouped matmul (with backward) on `device` in `dtype`; else why not.

    Probes a tiny forward+backward once per (device, dtype): support differs by torch version, device and GPU
    generation, and the only reliable test is to try. Every matrix width must also be a multiple of 16 bytes.
    """
    if not hasattr(torch, "_grouped_mm") and not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no grouped_mm"
    align = 16 // torch.empty((), dtype=dtype).element_size()
    bad = [w for w in widths if w % align]
    if bad:
        return f"widths {bad} are not multiples of {align} elements (16 bytes in {dtype})"
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_PROBE:
        try:
            a = torch.randn(8, align, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(2, align, align, device=device, dtype=dtype, requires_grad=True)
            out = _grouped_mm(a, b, torch.tensor([3, 8], device=device, dtype=torch.int32))
            out.backward(torch.randn_like(out))
            _GROUPED_MM_PROBE[key] = None
        except (RuntimeError, NotImplementedError) as exc:
            _GROUPED_MM_PROBE[key] = f"grouped_mm failed on {device} in {dtype}: {str(exc).splitlines()[0]}"
    return _GROUPED_MM_PROBE[key]


def resolve_backend(backend: Backend, device: torch.device, dtype: torch.dtype, widths: tuple[int, ...]) -> Backend:
    """The concrete backend for `backend` on this device. "auto" takes grouped_mm on accelerators that support it
    and the padded batched matmul elsewhere (on CPU, torch's grouped_mm is a slow per-group loop: see docs/moe.md;
    "segmented" is faster still on CPU, chosen by config). Asking for grouped_mm where it cannot run is a
    DeviceError, never a silent fallback."""
    if backend == "auto":
        if device.type != "cpu" and grouped_mm_unsupported_reason(device, dtype, widths) is None:
            return "grouped_mm"
        return "padded_bmm"
    if backend == "grouped_mm":
        reason = grouped_mm_unsupported_reason(device, dtype, widths)
        if reason is not None:
            raise DeviceError(f"expert backend 'grouped_mm' unavailable: {reason}; use 'padded_bmm' or 'auto'")
    return backend


def swiglu_halves(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) ⊙ up of a `[..., 2H]` row whose first half is the gate and second half the up projection."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def expert_compute(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    backend: Literal["grouped_mm", "padded_bmm", "segmented"],
    lowp: LowPrecision | None = None,
) -> torch.Tensor:
    """SwiGLU of each row with its expert's weights. x_sorted `[S, D]` grouped by expert with `counts` `[E]`;
    w13 `[E, D, 2H]` (gate columns then up columns), w2 `[E, H, D]`. Returns `[S, D]` in the same order.

    padded_bmm copies the rows into `[E, C, D]` with C = max count (dropless: C grows with the busiest expert, so
    memory is E·C·D, at worst E·S·D when every row picks one expert). segmented splits the rows into each expert's
    segment (views, no copy) and runs two matmuls per non-empty expert: no padding, E small matmuls instead of two
    batched ones; split/unbind/cat keep the backward free of per-expert full-size zero gradients.
    """
    if lowp is not None:
        x_sorted, w13 = fake_quantize(x_sorted, lowp, dim=-1), fake_quantize(w13, lowp, dim=1)
        w2 = fake_quantize(w2, lowp, dim=1)
    if backend == "grouped_mm":
        # grouped_mm is not on autocast's list: cast by hand so it computes in the autocast dtype like bmm would.
        device_type = x_sorted.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_sorted.dtype
        offs = counts.cumsum(0).to(torch.int32)
        h = swiglu_halves(_ContiguousGrad.apply(_grouped_mm(x_sorted.to(dtype), w13.to(dtype), offs)))
        if lowp is not None:
            h = fake_quantize(h, lowp, dim=-1)
        out: torch.Tensor = _ContiguousGrad.apply(_grouped_mm(h, w2.to(dtype), offs))
        return out
    if backend == "segmented":
        return _segmented(x_sorted, counts, w13, w2, lowp)
    n_experts, s = counts.shape[0], x_sorted.shape[0]
    cap = int(counts.max())
    starts = counts.cumsum(0) - counts
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=counts.device), counts, output_size=s)
    slot = expert_of_row * cap + torch.arange(s, device=counts.device) - starts[expert_of_row]
    # source row of each padded slot; s (one past the end) marks padding and reads a zero row.
    source = torch.full((n_experts * cap,), s, dtype=torch.long, device=counts.device)
    source[slot] = torch.arange(s, device=counts.device)
    padded: torch.Tensor = _GatherRows.apply(x_sorted, source, slot, 1, True, False)
    h = swiglu_halves(torch.bmm(padded.view(n_experts, cap, -1), w13))
    if lowp is not None:
        h = fake_quantize(h, lowp, dim=-1)
    out = torch.bmm(h, w2).view(n_experts * cap, -1)
    rows: torch.Tensor = _GatherRows.apply(out, slot, source, 1, False, True)
    return rows


@dataclass(frozen=True)
class ExpertShard:
    """This rank's share of the routed experts: experts [rank·E/W, (rank + 1)·E/W) of E, tokens exchanged over
    `group` (a torch.distributed process group of the W expert-parallel ranks)."""

    rank: int
    world_size: int
    group: Any

    def local_range(self, n_experts: int) -> tuple[int, int]:
        per = n_experts // self.world_size
        return self.rank * per, (self.rank + 1) * per


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Differentiable all-to-all of rows: rows [sum(in_splits[:q]), ...) go to rank q; `out_splits[q]` rows come
    from rank q, in rank order. The backward is the reverse exchange."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    out = all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    wait = getattr(out, "wait", None)
    return wait() if wait is not None else out


def expert_parallel(
    x_sorted: torch.Tensor,
    counts: torch.Tensor,
    w13_local: torch.Tensor,
    w2_local: torch.Tensor,
    shard: ExpertShard,
    backend: Literal["grouped_mm", "padded_bmm", "segmented"],
    lowp: LowPrecision | None = None,
) -> torch.Tensor:
    """`expert_compute` with the experts spread over ranks. x_sorted `[S, D]` grouped by global expert with
    `counts` `[E]` (this rank's tokens); w13_local `[E/W, D, 2H]`, w2_local `[E/W, H, D]` (this rank's experts).
    Returns `[S, D]` in x_sorted's order. Every rank of `shard.group` must call it (collective)."""
    import torch.distributed as dist

    w, per = shard.world_size, w13_local.shape[0]
    send = counts.view(w, per)  # rows for rank q's experts, per local expert of q
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=shard.group)
    in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    x_recv = _all_to_all(x_sorted, out_splits, in_splits, shard.group)  # rows by (source rank, local expert)
    # Regroup the received rows by local expert (stable: source-rank order within an expert), compute, undo.
    expert_of_row = torch.arange(per, device=counts.device).repeat(w)
    expert_of_row = torch.repeat_interleave(expert_of_row, recv.flatten(), output_size=x_recv.shape[0])
    order = torch.argsort(expert_of_row, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    y_local = expert_compute(x_recv.index_select(0, order), recv.sum(0), w13_local, w2_local, backend, lowp)
    return _all_to_all(y_local.index_select(0, inverse), in_splits, out_splits, shard.group)


def _segmented(x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               lowp: LowPrecision | None) -> torch.Tensor:
    outs = []
    for x_e, w13_e, w2_e in zip(x_sorted.split(counts.tolist()), w13.unbind(0), w2.unbind(0), strict=True):
        if x_e.shape[0] == 0:
            continue
        h = swiglu_halves(x_e @ w13_e)
        if lowp is not None:
            h = fake_quantize(h, lowp, dim=-1)
        outs.append(h @ w2_e)
    if not outs:  # no rows (no token routed to this rank's experts): still part of the graph, so that the backward
        # reaches the all-to-all that brought the (zero) rows here
        return x_sorted @ x_sorted.new_zeros(x_sorted.shape[1], w2.shape[-1])
    return torch.cat(outs)
