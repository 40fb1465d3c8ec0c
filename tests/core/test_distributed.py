"""torch.distributed helpers: single-process mode, environment checks, and a real 2-process gloo group."""

from __future__ import annotations

import pytest
import torch

from cambium.core import distributed as cdist
from cambium.core.errors import DeviceError, DistributedError


def test_single_process_mode_without_torchrun_env() -> None:
    info = cdist.init_distributed(env={})
    assert (info.rank, info.world_size, info.local_rank, info.backend, info.is_main) == (0, 1, 0, None, True)
    assert not cdist.is_distributed()
    assert (cdist.get_rank(), cdist.get_world_size(), cdist.is_main()) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    out = cdist.all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    assert cdist.all_reduce_mean(torch.tensor([3])).dtype == torch.float64
    cdist.barrier()
    cdist.teardown()
    with cdist.distributed(env={}) as info2:
        assert info2.world_size == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_nccl_or_cuda_without_cuda_is_a_device_error() -> None:
    with pytest.raises(DeviceError, match="needs CUDA"):
        cdist.init_distributed(backend="nccl", env={})
    with pytest.raises(DeviceError, match="needs CUDA"):
        cdist.init_distributed(device="cuda", env={})


def test_bad_torchrun_environment() -> None:
    base = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(DistributedError, match=r"RANK='x' is not an integer"):
        cdist.init_distributed(env={**base, "RANK": "x"})
    with pytest.raises(DistributedError, match="RANK=2, WORLD_SIZE=2"):
        cdist.init_distributed(env={**base, "RANK": "2"})
    with pytest.raises(DistributedError, match="MASTER_PORT is not set"):
        cdist.init_distributed(env={k: v for k, v in base.items() if k != "MASTER_PORT"})
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set"):
        cdist.init_distributed(env={**base, "MASTER_ADDR": ""})


def test_two_process_gloo_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pin gloo to loopback: in containers the hostname may resolve to an address the ranks cannot reach.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    world = 2
    results = cdist.selftest(world, timeout_s=60)
    for rank, res in enumerate(results):
        assert res["info"] == [rank, world, rank, "gloo"]
        assert res["helpers"] == [rank, world, rank == 0, True]
        assert res["mean"] == [1.5, 15.0]
        assert res["sum"] == [3]
        assert res["after_teardown"] == [False, 1]
