"""Data and expert parallelism of the MoE trainer under torchrun (MOE-9), and its sharded checkpoint state (MOE-13).

`MoEParallel.setup(model, dist, expert_parallel=...)` turns one process's model into rank r of W:

- data parallel: rank r trains on rows r::W of every global batch (`MixtureLoader(rank, world_size)`), so the W ranks
  together step on the batch one process would; the dense parameters are wrapped in DistributedDataParallel, whose
  gradient all-reduce averages the ranks' gradients of their local mean losses into the global mean's gradient;
- expert parallel (`expert_parallel=True`): each rank keeps E/W routed experts of every MoE layer (`MoE.shard_experts`,
  `n_routed_experts % W == 0`), DDP leaves them out, and tokens reach their expert's rank by all-to-all on a process
  group of their own (so the DDP all-reduces and the token exchanges never interleave on one communicator). An
  expert's gradient already sums every rank's tokens: it is divided by W to be the global mean's.

`reduce_step` sums the per-expert loads over ranks (the aux-loss-free bias then moves alike everywhere) and averages
the logged losses and entropies; `clip_grad_norm` measures the global gradient norm with each rank's experts counted
once.

`sharded_state` / `load_sharded_state`: the model and optimiser tensors keyed by parameter name for
`torch.distributed.checkpoint`, routed experts as DTensors sharded on the expert dimension over a DeviceMesh of the
W ranks, so a checkpoint written at one world size loads at another (and in one process, with plain tensors).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cambium.core.distributed import DistInfo
from cambium.core.errors import CheckpointError, ConfigError
from cambium.core.optim import MuonWithAdamW
from cambium.moe.model import MoETransformer
from cambium.nn.moe_experts import ExpertShard

__all__ = ["MoEParallel", "load_sharded_state", "sharded_state"]

_OPTIM_TENSOR_KEYS = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer")


@dataclass
class MoEParallel:
    """How this process takes part in a multi-rank run: `wrapped` is the module to call for training forwards (DDP
    around the model), `shard` the expert shard (None: every rank holds every expert), `mesh` the DeviceMesh of the
    expert-parallel ranks (for the sharded checkpoint)."""

    dist: DistInfo
    wrapped: nn.Module
    shard: ExpertShard | None
    mesh: Any

    @classmethod
    def setup(cls, model: MoETransformer, info: DistInfo, *, expert_parallel: bool) -> MoEParallel:
        from torch.distributed.device_mesh import DeviceMesh

        expert_names: list[str] = []
        shard: ExpertShard | None = None
        mesh = None
        layers = model.moe_layers()
        if expert_parallel and layers:
            e = layers[0].n_experts
            if e % info.world_size:
                raise ConfigError(f"expert parallel needs model.moe.n_routed_experts % world_size == 0, got "
                                  f"{e} experts over {info.world_size} ranks; launch a world size that divides {e} "
                                  "or set train.expert_parallel=false")
            # Its own communicator: DDP's bucket all-reduces run asynchronously during backward, the token
            # exchanges synchronously inside it; on one gloo group their order could differ between ranks.
            group = dist.new_group(list(range(info.world_size)))
            shard = ExpertShard(info.rank, info.world_size, group)
            mesh = DeviceMesh.from_group(group, info.device.type, mesh_dim_names=("ep",))
            for layer in layers:
                layer.shard_experts(shard)
            expert_names = [n for n, _ in model.named_parameters() if model.param_kind(n) == "expert"]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_names)
        ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
        return cls(info, wrapped, shard, mesh)

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def expert_params(self, model: nn.Module) -> Iterator[torch.Tensor]:
        if self.shard is None:
            return iter(())
        return (p for n, p in model.named_parameters() if n.endswith((".ffn.w13", ".ffn.w2")))

    def finish_grads(self, model: MoETransformer) -> None:
        """After the step's backward passes: the sharded experts' gradients become the global mean loss's (the
        dense ones already are, averaged by DDP)."""
        for p in self.expert_params(model):
            if p.grad is not None:
                p.grad.div_(self.world_size)

    def clip_grad_norm(self, model: MoETransformer, max_norm: float | None) -> float:
        """The global gradient norm (dense gradients are the same on every rank and count once; each rank's experts
        count once), clipped to `max_norm` like `MuonWithAdamW.clip_grad_norm`; non-finite: nothing scaled."""
        experts = {id(p) for p in self.expert_params(model)}
        # On the collective's device: NCCL reduces CUDA tensors only.
        dense_sq = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        expert_sq = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        grads = []
        for p in model.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).double().to(self.dist.device) ** 2
            if id(p) in experts:
                expert_sq += sq
            else:
                dense_sq += sq
        if experts:
            dist.all_reduce(expert_sq, group=self.shard.group if self.shard is not None else None)
        total = float((dense_sq + expert_sq).sqrt())
        if max_norm is not None and math.isfinite(total) and total > max_norm:
            coef = max_norm / (total + 1e-6)
            for grad in grads:
                grad.mul_(coef)
        return total

    def reduce_step(self, scalars: list[float], loads: list[torch.Tensor], entropies: list[torch.Tensor]
                    ) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor]]:
        """Mean over ranks of `scalars` and `entropies` (each rank's are means over equal shares of the batch), sum
        of `loads` (counts `[E]` per layer), in one all-reduce of float64 (exact for counts below 2**53)."""
        n_s, n_e = len(scalars), len(entropies)
        dev = self.dist.device  # NCCL reduces CUDA tensors only
        parts = [torch.tensor(scalars, dtype=torch.float64, device=dev),
                 *(e.detach().double().reshape(1).to(dev) for e in entropies),
                 *(ld.detach().double().to(dev) for ld in loads)]
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        w = self.world_size
        out_scalars = (flat[:n_s] / w).tolist()
        out_ent = [t.to(e.device) for t, e in zip((flat[n_s:n_s + n_e] / w).float().unbind(), entropies,
                                                    strict=True)]
        out_loads, offset = [], n_s + n_e
        for ld in loads:
            out_loads.append(flat[offset:offset + ld.numel()].round().to(ld.device, ld.dtype).view_as(ld))
            offset += ld.numel()
        return out_scalars, out_loads, out_ent


def _is_expert(model: MoETransformer, name: str) -> bool:
    return model.param_kind(name) == "expert"


def _optimizer_tensors(optimizer: MuonWithAdamW) -> Iterator[tuple[str, torch.optim.Optimizer, nn.Parameter]]:
    for opt in optimizer.optimizers:
        for group in opt.param_groups:
            yield from ((name, opt, p) for name, p in zip(group["param_names"], group["params"], strict=True))


def sharded_state(model: MoETransformer, optimizer: MuonWithAdamW, mesh: Any) -> dict[str, Any]:
    """`{"model/<name>": tensor, "optim/<param name>/<key>": tensor}`: routed experts (and their optimiser moments)
    as DTensors sharded on dim 0 over `mesh` when it is given, everything else as plain (replicated) tensors."""
    from torch.distributed.tensor import DTensor, Shard

    def wrap(name: str, t: torch.Tensor) -> Any:
        if mesh is not None and _is_expert(model, name) and t.ndim == 3:
            return DTensor.from_local(t.detach(), mesh, [Shard(0)], run_check=False)
        return t.detach()

    state: dict[str, Any] = {f"model/{n}": wrap(n, t) for n, t in model.state_dict().items()}
    for name, opt, p in _optimizer_tensors(optimizer):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                state[f"optim/{name}/{key}"] = wrap(name, value)
    return state


def load_sharded_state(path: Path, model: MoETransformer, optimizer: MuonWithAdamW | None = None,
                       mesh: Any = None) -> None:
    """Fill `model` and `optimizer` (its param groups already restored; None: the model alone) from a
    `sharded_state` written with DCP at any world size: every key is read into a tensor of this process's layout
    (its expert shard under `mesh`, the whole tensor without)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.tensor import DTensor, Shard

    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the sharded state cannot be read: {exc}") from None
    saved = metadata.state_dict_metadata
    params = dict(model.named_parameters())
    own = model.state_dict()
    missing = sorted(f"model/{n}" for n in own if f"model/{n}" not in saved)
    if missing:
        raise CheckpointError(f"{path}: the sharded state lacks {missing[:3]} (another model?)")

    def template(name: str, local: torch.Tensor) -> Any:
        if mesh is not None and _is_expert(model, name) and local.ndim == 3:
            return DTensor.from_local(torch.empty_like(local), mesh, [Shard(0)], run_check=False)
        return torch.empty_like(local)

    targets: dict[str, Any] = {f"model/{n}": template(n, t) for n, t in own.items()}
    by_name = {name: (opt, p) for name, opt, p in _optimizer_tensors(optimizer)} if optimizer is not None else {}
    optim_keys: list[tuple[str, str, str]] = []
    for key, md in saved.items():
        if not key.startswith("optim/") or optimizer is None:
            continue
        _, name, what = key.split("/", 2)
        if name not in by_name or what not in _OPTIM_TENSOR_KEYS:
            raise CheckpointError(f"{path}: optimiser entry {key!r} belongs to no parameter of this model")
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{path}: optimiser entry {key!r} is not a tensor")
        p = params[name]
        shape = tuple(md.size)
        local = torch.empty(p.shape if shape and shape[1:] == tuple(p.shape[1:]) else shape,
                            dtype=md.properties.dtype)
        targets[key] = template(name, local) if local.shape == p.shape else local
        optim_keys.append((key, name, what))
    try:
        dcp.load(targets, checkpoint_id=str(path))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the sharded state does not fit this model: {exc}") from None

    def local_of(value: Any) -> torch.Tensor:
        return value.to_local() if isinstance(value, DTensor) else value

    with torch.no_grad():
        for n, t in own.items():
            t.copy_(local_of(targets[f"model/{n}"]))
    for opt in optimizer.optimizers if optimizer is not None else []:
        opt.state.clear()
    for key, name, what in optim_keys:
        opt, p = by_name[name]
        opt.state[p][what] = local_of(targets[key]).to(p.device if what != "step" else "cpu")
