"""torch.distributed from torchrun's environment, and a single-process mode when that environment is absent.

`init_distributed()` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (set by `torchrun`) and joins the
process group: gloo on CPU, NCCL on CUDA. Without RANK/WORLD_SIZE it does nothing and reports rank 0 of 1, so the same
training code runs under `python -m ...` and under `torchrun --nproc_per_node N ...`. The helpers (`get_rank`,
`all_reduce_mean`, `barrier`, ...) work in both modes. Asking for NCCL or CUDA on a machine without CUDA is a
DeviceError: there is no silent downshift to gloo.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from cambium.core.errors import DeviceError, DistributedError

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "distributed",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "selftest",
    "teardown",
]

Backend = Literal["gloo", "nccl"]
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: `backend` is None in single-process mode."""

    rank: int
    world_size: int
    local_rank: int
    backend: Backend | None
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise DistributedError(f"{name} is not set but RANK/WORLD_SIZE are; launch with torchrun, which sets "
                               f"{', '.join(_TORCHRUN_VARS)}")
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer; launch with torchrun") from None


def init_distributed(
    device: Literal["cpu", "cuda"] = "cpu",
    backend: Backend | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> DistInfo:
    """Join the process group described by torchrun's environment, or enter single-process mode without one.

    device: "cpu" (default backend gloo) or "cuda" (default backend nccl; each rank uses cuda:LOCAL_RANK).
    env: the environment to read (default: os.environ). Calling it again in an initialised process returns the
    existing group's info.
    """
    if device not in ("cpu", "cuda"):
        raise DeviceError(f"device={device!r} must be 'cpu' or 'cuda'")
    backend = backend or ("nccl" if device == "cuda" else "gloo")
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"backend={backend!r} must be 'gloo' or 'nccl'")
    if (backend == "nccl" or device == "cuda") and not torch.cuda.is_available():
        raise DeviceError(f"backend={backend!r} on device={device!r} needs CUDA, which this machine does not have; "
                          "use device='cpu' (gloo)")
    if backend == "nccl" and device == "cpu":
        raise DeviceError("backend='nccl' needs device='cuda'; use gloo for CPU tensors")
    env = os.environ if env is None else env

    if "RANK" not in env and "WORLD_SIZE" not in env:
        return DistInfo(0, 1, 0, None, torch.device("cuda", 0) if device == "cuda" else torch.device("cpu"))

    rank, world_size = _int_var(env, "RANK"), _int_var(env, "WORLD_SIZE")
    local_rank = _int_var(env, "LOCAL_RANK")
    port = _int_var(env, "MASTER_PORT")
    addr = env.get("MASTER_ADDR")
    if not addr:
        raise DistributedError("MASTER_ADDR is not set; launch with torchrun")
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
                               f"LOCAL_RANK={local_rank}")
    torch_device = torch.device("cpu")
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise DistributedError(f"process group already initialised as rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, but the environment says {rank} of {world_size}")
        return DistInfo(rank, world_size, local_rank, backend, torch_device)
    try:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{addr}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the {backend} process group at {addr}:{port} as rank {rank} of "
                               f"{world_size}: {exc}") from exc
    return DistInfo(rank, world_size, local_rank, backend, torch_device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in single-process mode): the rank that writes reports and prints."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks, as a new tensor (the input is left unchanged)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks, as a new tensor (integer tensors are averaged in float64)."""
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    return all_reduce_sum(tensor) / get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    """Leave the process group (no-op in single-process mode); safe to call twice."""
    if is_distributed():
        dist.destroy_process_group()


@contextmanager
def distributed(
    device: Literal["cpu", "cuda"] = "cpu",
    backend: Backend | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> Iterator[DistInfo]:
    """`init_distributed` on entry, `teardown` on exit (also after an exception)."""
    info = init_distributed(device, backend, env=env, timeout_s=timeout_s)
    try:
        yield info
    finally:
        teardown()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _selftest_worker(rank: int, world_size: int, port: int, out_dir: str, timeout_s: float) -> None:
    env = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with distributed(env=env, timeout_s=timeout_s) as info:
        mean = all_reduce_mean(torch.tensor([rank + 1.0, 10.0 * (rank + 1)]))
        total = all_reduce_sum(torch.tensor([rank + 1]))
        barrier()
        result: dict[str, Any] = {
            "info": [info.rank, info.world_size, info.local_rank, info.backend],
            "helpers": [get_rank(), get_world_size(), is_main(), is_distributed()],
            "mean": mean.tolist(),
            "sum": total.tolist(),
        }
    result["after_teardown"] = [is_distributed(), get_world_size()]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def selftest(world_size: int = 2, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Spawn `world_size` CPU processes joined by gloo on 127.0.0.1 (a free port) and run the helpers in each.

    Rank r contributes [r+1, 10(r+1)] to `all_reduce_mean` and [r+1] to `all_reduce_sum`. Returns one dict per rank
    with what it saw: `info` [rank, world, local_rank, backend], `helpers` [get_rank, get_world_size, is_main,
    is_distributed], `mean`, `sum`, and `after_teardown` [is_distributed, get_world_size]. Raises DistributedError
    if a rank fails.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise DistributedError(f"world_size={world_size} must be >= 1")
    with tempfile.TemporaryDirectory(prefix="cambium-dist-") as out_dir:
        try:
            mp.spawn(_selftest_worker, args=(world_size, _free_port(), out_dir, timeout_s), nprocs=world_size,
                     join=True)
        except mp.ProcessRaisedException as exc:
            raise DistributedError(f"distributed self-test failed in a rank: {exc}") from exc
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
