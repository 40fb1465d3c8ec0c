"""The tiny configs on a CUDA device through the core loop. Skipped where torch sees no CUDA device.

Each trainer runs a few steps on `cuda` and on `cpu` from the same seed: the run must land on the GPU (parameters,
checkpointed CUDA RNG state), its losses must be finite and its first loss must agree with the CPU's (the first
forward sees the same weights and batch; kernels differ only in summation order). MFU comes from the GPU's measured
peak (`cambium doctor`). Run it with `.venv/bin/python -m pytest -q tests/test_cuda.py` on a machine with a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.config import load
from cambium.core.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() "
                                "is False on this machine (the CPU suite covers the same code on device='cpu')")

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def _losses(run_dir: Path, name: str) -> list[float]:
    return [r.value for r in read_metrics(run_dir / "metrics.duckdb") if r.name == name]


def _check_checkpoint_holds_cuda_rng(run_dir: Path) -> None:
    path = latest_checkpoint(run_dir / "checkpoints")
    assert path is not None
    assert load_checkpoint(path).rng["cuda"] is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_moe_tiny_on_cuda(tmp_path: Path, dtype: str) -> None:
    from cambium.data.mixture import prepare_mixture
    from cambium.moe.config import MoEConfig
    from cambium.moe.train import train

    runs: dict[str, Path] = {}
    for device in ("cpu", "cuda"):
        cfg = load(REPO / "configs/moe/tiny.toml", MoEConfig, [
            f"data.mixture.out_dir={tmp_path / 'mixture'}", f"train.max_steps={STEPS}", f"train.device={device}",
            f"train.dtype={dtype}", "train.checkpoint_every=2", "train.eval_windows=2"])
        prepare_mixture(cfg.data.mixture)
        runs[device] = train(cfg, tmp_path / device, show_progress=False, measure_peak=device == "cuda").run_dir
    gpu, cpu = _losses(runs["cuda"], "loss"), _losses(runs["cpu"], "loss")
    assert len(gpu) == STEPS and all(map(torch.isfinite, torch.tensor(gpu)))
    assert gpu[0] == pytest.approx(cpu[0], rel=2e-2 if dtype == "bfloat16" else 1e-4)
    assert _losses(runs["cuda"], "perf/mfu")[-1] > 0
    _check_checkpoint_holds_cuda_rng(runs["cuda"])


def test_nested_tiny_on_cuda(tmp_path: Path) -> None:
    from cambium.data.mixture import prepare_mixture
    from cambium.nested.build import build
    from cambium.nested.config import NestedConfig

    runs: dict[str, Path] = {}
    for device in ("cpu", "cuda"):
        cfg = load(REPO / "configs/nested/tiny.toml", NestedConfig, [
            f"context.mixture.out_dir={tmp_path / 'mixture'}", f"build.max_steps={STEPS}", f"build.device={device}",
            "build.eval_chunks=2"])
        prepare_mixture(cfg.context.mixture)
        runs[device] = build(cfg, tmp_path / device, show_progress=False).run_dir
    gpu, cpu = _losses(runs["cuda"], "loss"), _losses(runs["cpu"], "loss")
    assert len(gpu) == STEPS and all(map(torch.isfinite, torch.tensor(gpu)))
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-4)
    _check_checkpoint_holds_cuda_rng(runs["cuda"])


def test_worldmodel_micro_pipeline_on_cuda(tmp_path: Path) -> None:
    from cambium.worldmodel.config import CONFIG_MODEL
    from cambium.worldmodel.pipeline import run_pipeline

    micro = ['data.symbols=["BTCUSDT","ETHUSDT"]', "tokenizer.hidden_channels=16", "jepa.seq_len=8",
             "jepa.encoder.d_model=16", "jepa.encoder.n_layers=1", "jepa.encoder.n_heads=2",
             "jepa.encoder.chunk_size=8", "jepa.predictor.hidden_dim=32", "train_tokenizer.steps=4",
             "train_tokenizer.batch_size=8", "train_jepa.steps=4", "train_jepa.batch_size=4",
             "pipeline.checkpoint_every=2", f"data.klines_glob={REPO}/data/samples/market/klines_1h_futures/*.csv.gz"]
    runs: dict[str, Path] = {}
    for device in ("cpu", "cuda"):
        cfg = load(REPO / "configs/worldmodel/tiny.toml", CONFIG_MODEL, [*micro, f"pipeline.device={device}"])
        runs[device] = run_pipeline(cfg, tmp_path / device, show_progress=False).run_dir
    for name in ("tokenizer/loss", "jepa/loss"):
        gpu, cpu = _losses(runs["cuda"], name), _losses(runs["cpu"], name)
        assert len(gpu) == 4 and all(map(torch.isfinite, torch.tensor(gpu)))
        assert gpu[0] == pytest.approx(cpu[0], rel=1e-3)
    assert (runs["cuda"] / "report" / "report.md").is_file()
