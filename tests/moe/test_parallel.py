"""Data and expert parallelism of the MoE trainer (MOE-9): 2 gloo processes equal 1 process on the same global batch;
an expert-sharded layer equals the whole one; an uneven expert split is refused; SIGKILL of one rank resumes bitwise
at 2 ranks and within fp32 tolerance at 1 (sharded checkpoints, MOE-13)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from cambium.core.config import load
from cambium.core.distributed import DistInfo
from cambium.core.errors import ConfigError
from cambium.core.metrics import read_metrics
from cambium.core.progress import ENV_HOLD_STEP, ENV_PROGRESS
from cambium.core.testing import metric_key_rows
from cambium.data.mixture import prepare_mixture
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer
from cambium.moe.parallel import MoEParallel
from cambium.nn.moe import MoE
from cambium.nn.moe_experts import ExpertShard

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "moe" / "tiny.toml"
TOL = {"rel": 2e-5, "abs": 2e-6}


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe-par") / "mixture"
    prepare_mixture(load(TINY, MoEConfig, [f"data.mixture.out_dir={out}"]).data.mixture)
    return out


def _args(mixture_dir: Path, runs: Path, *extra: str) -> list[str]:
    sets = [f"data.mixture.out_dir={mixture_dir}", "train.max_steps=6", "train.eval_every=3", "train.eval_windows=2",
            "train.checkpoint_every=2", "train.threads=1", *extra]
    return ["train", "--config", str(TINY), "--runs-dir", str(runs), "--no-prep",
            *(a for s in sets for a in ("--set", s))]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_PROGRESS, ENV_HOLD_STEP)}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _launch(nproc: int, args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    head = [sys.executable, "-m", "cambium.moe"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "cambium.moe"]
    return subprocess.run([*head, *args], env=_env(**env), cwd=REPO, capture_output=True, text=True, timeout=300)


def _only_run(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir() and (p / "metrics.duckdb").exists()]
    return run


def _series(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(run / "metrics.duckdb"):
        if not r.name.startswith("perf/"):
            out.setdefault(r.name, []).append((r.step, r.value))
    return {k: sorted(v) for k, v in out.items()}


def _assert_close(expected: dict[str, list[tuple[int, float]]], actual: dict[str, list[tuple[int, float]]]) -> None:
    assert set(expected) == set(actual)
    for name, rows in expected.items():
        assert [s for s, _ in rows] == [s for s, _ in actual[name]], name
        assert [v for _, v in actual[name]] == pytest.approx([v for _, v in rows], **TOL), name


@pytest.mark.slow
def test_two_gloo_processes_give_the_one_process_losses(mixture_dir: Path, tmp_path: Path) -> None:
    """Same global batch (rows r::2 on rank r): every logged metric (losses, grad norm, loads, biases, validation)
    matches the single process within fp32 tolerance, data parallel alone and with the experts sharded."""
    one = _launch(1, _args(mixture_dir, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    reference = _series(_only_run(tmp_path / "one"))
    assert len(reference["lm_loss"]) == 6
    for mode in ("false", "true"):
        runs = tmp_path / f"two-ep-{mode}"
        two = _launch(2, _args(mixture_dir, runs, f"train.expert_parallel={mode}"))
        assert two.returncode == 0, two.stderr[-3000:]
        _assert_close(reference, _series(_only_run(runs)))
        if mode == "true":  # the sharded checkpoint holds both ranks' experts
            run = _only_run(runs)
            share = [[r.value for r in read_metrics(run / f"metrics.rank{k}.duckdb", [f"rank{k}/expert_rows_share"])]
                     for k in range(2)]
            assert len(share[0]) == len(share[1]) == 6
            assert [a + b for a, b in zip(*share, strict=True)] == pytest.approx([1.0] * 6)
            local = [read_metrics(run / f"metrics.rank{k}.duckdb", [f"rank{k}/lm_loss"]) for k in range(2)]
            assert (local[0][-1].value + local[1][-1].value) / 2 == pytest.approx(reference["lm_loss"][-1][1], **TOL)
            ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
            assert {p.name for p in (ckpt / "shards").iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                     "cursor_rank1.json"}


def test_an_uneven_expert_split_is_refused_with_the_numbers() -> None:
    cfg = load(TINY, MoEConfig, ["model.moe.n_routed_experts=6"])
    model = MoETransformer(cfg.model)
    with pytest.raises(ConfigError, match=r"n_routed_experts % world_size == 0, got 6 experts over 4 ranks"):
        MoEParallel.setup(model, DistInfo(0, 4, 0, "gloo", torch.device("cpu")), expert_parallel=True)
    layer = MoE(16, 6, 2, 8)
    with pytest.raises(ConfigError, match=r"n_routed_experts=6 over 4 ranks"):
        layer.shard_experts(ExpertShard(0, 4, None))
    with pytest.raises(ConfigError, match=r"backend='loop'"):
        MoE(16, 6, 2, 8, backend="loop").shard_experts(ExpertShard(0, 2, None))


def _sharded_layer_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        full = MoE(16, 8, 2, 8, n_shared_experts=1, backend="padded_bmm")
        x = torch.randn(2, 6, 16)  # the same on both ranks; rank r takes batch row r
        y_full, _ = full(x)
        (y_full.pow(2).sum() / 2).backward()
        local = MoE(16, 8, 2, 8, n_shared_experts=1, backend="padded_bmm")
        local.load_state_dict(full.state_dict())
        local.shard_experts(ExpertShard(rank, 2, dist.group.WORLD))
        y, _ = local(x[rank : rank + 1])
        (y.pow(2).sum() / 2).backward()
        lo, hi = 4 * rank, 4 * rank + 4
        torch.save({"y": y.detach(), "y_ref": y_full[rank : rank + 1].detach(), "g13": local.w13.grad,
                    "g13_ref": full.w13.grad[lo:hi], "g2": local.w2.grad, "g2_ref": full.w2.grad[lo:hi]},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_layer_equals_the_whole_layer_outputs_and_expert_gradients(tmp_path: Path) -> None:
    """Each rank's tokens reach experts on both ranks and come back: outputs equal the whole layer's, and each
    rank's expert gradients are the sums over both ranks' tokens (the whole layer's on the whole batch)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_layer_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["y"], got["y_ref"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["g13"], got["g13_ref"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["g2"], got["g2_ref"], rtol=1e-5, atol=1e-6)


def _rank_pid(launcher: subprocess.Popen[bytes], rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "cambium.moe" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no rank {rank} process under torchrun {launcher.pid}")


def _kill_rank_after(args: list[str], runs: Path, step: int, work: Path) -> str:
    """Start a 2-rank run, SIGKILL rank 1 once rank 0 reports `step` (rank 0 holds there); the run id."""
    progress = work / "progress.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "cambium.moe", *args]
    launcher = subprocess.Popen(cmd, env=_env(**{ENV_PROGRESS: str(progress), ENV_HOLD_STEP: str(step)}), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while f"step {step}" not in (progress.read_text().split("\n") if progress.exists() else []):
            assert launcher.poll() is None, "the 2-rank run ended before the kill point"
            assert time.monotonic() < deadline, "the 2-rank run did not reach the kill point"
            time.sleep(0.05)
        os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0  # torchrun tears the other rank down and fails
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    return next(line.split()[1] for line in progress.read_text().split("\n") if line.startswith("run "))


@pytest.mark.slow
def test_sigkill_of_one_rank_resumes_bitwise_at_two_ranks_and_within_tolerance_at_one(mixture_dir: Path,
                                                                                     tmp_path: Path) -> None:
    ref_runs = tmp_path / "reference"
    ref = _launch(2, _args(mixture_dir, ref_runs))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _only_run(ref_runs)
    runs = tmp_path / "killed"
    run_id = _kill_rank_after(_args(mixture_dir, runs), runs, 3, tmp_path)  # last checkpoint: step 2
    # The same killed run twice: resumed at 2 ranks, then (its directory put back as the kill left it) at 1 rank.
    shutil.copytree(runs / run_id, tmp_path / "as-killed")
    two = _launch(2, [*_args(mixture_dir, runs), "--resume", run_id])
    assert two.returncode == 0, two.stderr[-3000:]
    assert metric_key_rows(runs / run_id / "metrics.duckdb") == metric_key_rows(reference / "metrics.duckdb")
    # At 1 rank: the experts of both ranks' shards are read back into one process's whole layers.
    shutil.rmtree(runs / run_id)
    shutil.copytree(tmp_path / "as-killed", runs / run_id)
    one = _launch(1, [*_args(mixture_dir, runs), "--resume", run_id])
    assert one.returncode == 0, one.stderr[-3000:]
    resumed = _series(runs / run_id)
    _assert_close(_series(reference), resumed)
    assert resumed["lm_loss"][-1][0] == 6


def test_nproc_refuses_an_uneven_split_before_launching(tmp_path: Path) -> None:
    from cambium.moe.cli import app

    with pytest.raises(ConfigError, match=r"got 7 experts over --nproc 2"):
        app(["train", "--nproc", "2", "--config", str(TINY), "--runs-dir", str(tmp_path), "--no-prep",
             "--set", "model.moe.n_routed_experts=7"], standalone_mode=False)
    assert not list(tmp_path.iterdir())  # no run was created
