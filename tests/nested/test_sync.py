"""NES-9: CMS-aware data parallelism. Two gloo processes, each on half the lanes, all-reducing only the gradients of
the parameters that step (frozen CMS levels keep theirs in local buffers until they fire), give the one-process
build of the same global batch: the same losses, gradient norms and held-out loss (to fp32 reduction order), and
rank 0's checkpoint holds every lane's context memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.distributed import _free_port
from cambium.core.metrics import read_metrics
from cambium.nested.build import build
from cambium.nested.model import ContextMemory

from .conftest import tiny_config

SETS = ("cms.periods=[1, 2]", "build.steps=5", "build.warmup_steps=1", "build.threads=1", "build.eval_every=5",
        "build.eval_chunks=2", "context.carry_attention=true")


def _rank(rank: int, port: int, mixture: str, runs: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    from cambium.core.distributed import teardown

    try:
        build(tiny_config(Path(mixture), *SETS), Path(runs), show_progress=False)
    finally:
        teardown()


def _rows(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(r.step, r.name): r.value for r in read_metrics(run_dir / "metrics.duckdb")
            if not r.name.startswith("perf/")}


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_of_the_same_global_batch(tiny_mixture: Path, tmp_path: Path) -> None:
    one = build(tiny_config(tiny_mixture, *SETS), tmp_path / "one", show_progress=False)
    mp.spawn(_rank, args=(_free_port(), str(tiny_mixture), str(tmp_path / "two")), nprocs=2, join=True)
    (two_dir,) = [p for p in (tmp_path / "two").iterdir() if p.is_dir() and "nested" in p.name]
    single, double = _rows(one.run_dir), _rows(two_dir)
    assert single.keys() == double.keys() and (5, "val/loss") in single
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key
    path = latest_checkpoint(two_dir / "checkpoints")
    assert path is not None
    memory = ContextMemory(2, 2)
    memory.load_state_dict(load_checkpoint(path).states["context_memory"])
    reference = ContextMemory(2, 2)
    ref_path = latest_checkpoint(one.run_dir / "checkpoints")
    assert ref_path is not None
    reference.load_state_dict(load_checkpoint(ref_path).states["context_memory"])
    for mine, theirs in zip(memory.states, reference.states, strict=True):
        assert mine is not None and theirs is not None
        for a, b in zip(mine, theirs, strict=True):
            assert a is not None and b is not None and a.params[0].shape[0] == 4  # all four lanes
            torch.testing.assert_close(a.params[0], b.params[0], rtol=1e-4, atol=1e-5)
