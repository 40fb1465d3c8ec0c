"""A small real trainer used to prove exact resume: a 2-layer char-level transformer on tiny Shakespeare.

    python tests/core/resume_trainer.py --runs-dir RUNS [--set train.steps=30 ...]  start a run
    python tests/core/resume_trainer.py --runs-dir RUNS --resume RUN_ID             resume it from its latest checkpoint

It uses every RNG a real trainer touches (torch for init and dropout, a numpy Generator for batch offsets, and the
python and numpy global RNGs, whose draws are logged as `probe/*` metrics so a wrong restore shows up in the rows),
AdamW with a warmup-cosine LambdaLR, metrics through `MetricsWriter` and checkpoints through `save_checkpoint`.
It follows the `cambium.core.testing` progress protocol when the harness sets its environment variables.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from torch import nn

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cambium.core.config import ConfigModel, load, load_data
from cambium.core.metrics import MetricsWriter
from cambium.core.progress import ProgressReporter
from cambium.core.runs import create_run, get_run, open_run

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = "data/samples/text/tinyshakespeare/input.txt"


class ModelConfig(ConfigModel):
    context: int = Field(32, ge=2, description="characters per training sequence")
    d_model: int = Field(64, ge=8, description="width of the residual stream")
    n_layers: int = Field(2, ge=1, description="transformer blocks")
    n_heads: int = Field(4, ge=1, description="attention heads per block")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout probability (exercises the torch RNG)")


class TrainConfig(ConfigModel):
    steps: int = Field(30, ge=1, description="optimizer steps in the whole run")
    batch_size: int = Field(8, ge=1, description="sequences per step")
    lr: float = Field(3e-3, gt=0.0, description="peak AdamW learning rate")
    warmup: int = Field(5, ge=0, description="linear warmup steps before the cosine decay")
    checkpoint_every: int = Field(5, ge=1, description="save a checkpoint after every this many steps")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept on disk")
    eval_every: int = Field(10, ge=1, description="log val_loss on a fixed held-out batch every this many steps")
    flush_rows: int = Field(12, ge=1, description="metric rows buffered before a write to DuckDB")
    seed: int = Field(1234, description="seed of every RNG")


class TrainerConfig(ConfigModel):
    data: str = Field(DEFAULT_DATA, description="text file to train on (relative paths from the repository root)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the transformer")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the optimisation")


class CharTransformer(nn.Module):
    """Token ids [B, T] -> next-character logits [B, T, V]."""

    def __init__(self, vocab: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab)
        self.mask: torch.Tensor
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(cfg.context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.embed(ids) + self.pos[:t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def load_text(path: Path) -> tuple[torch.Tensor, int]:
    """The file as character ids [N] (int64) and the vocabulary size (distinct bytes present)."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    present = np.unique(raw)
    lut = np.zeros(256, dtype=np.int64)
    lut[present] = np.arange(len(present))
    return torch.from_numpy(lut[raw]), len(present)


def batch(ids: torch.Tensor, offsets: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, T] starting at `offsets`."""
    idx = torch.from_numpy(offsets)[:, None] + torch.arange(context + 1)[None, :]
    chunk = ids[idx]
    return chunk[:, :-1], chunk[:, 1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", dest="root", required=True, help="runs directory (holds experiments.sqlite)")
    parser.add_argument("--resume", default=None, help="id (or unique prefix) of a run to resume")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override a.b=c")
    parser.add_argument("--skip-rng-restore", action="store_true",
                        help="deliberately resume without the RNG states (proves the harness catches it)")
    args = parser.parse_args(argv)

    # One thread makes every CPU kernel used here run in a fixed order. torch.use_deterministic_algorithms is not
    # needed on CPU and would import torch._dynamo (several seconds per process in torch 2.13).
    torch.set_num_threads(1)
    reporter = ProgressReporter.from_env()

    if args.resume:
        record = get_run(args.root, args.resume)
        cfg = load(record.dir / "config.toml", TrainerConfig, args.overrides)
        run = open_run(args.root, record.id, config=cfg)
    else:
        cfg = load_data({}, TrainerConfig, args.overrides)
        run = create_run(args.root, system="core-test", name="resume-trainer", config=cfg, seed=cfg.train.seed,
                         data_files=[_data_path(cfg)])
    reporter.run_started(run.id)
    tc = cfg.train

    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    data_rng = np.random.default_rng(tc.seed)
    ids, vocab = load_text(_data_path(cfg))
    split = int(len(ids) * 0.9)
    train_ids, val_ids = ids[:split], ids[split:]
    model = CharTransformer(vocab, cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, tc.warmup, tc.steps))
    val_x, val_y = batch(val_ids, np.arange(tc.batch_size) * 997 % (len(val_ids) - cfg.model.context - 1),
                         cfg.model.context)
    states = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    writer = MetricsWriter(run.metrics_path(), run.id, flush_rows=tc.flush_rows)
    start = 0
    if args.resume:
        latest = latest_checkpoint(run.checkpoint_dir)
        if latest is not None:
            ckpt = load_checkpoint(latest)
            ckpt.restore(states, generators={"data": data_rng}, rng=not args.skip_rng_restore)
            start = ckpt.step
            assert ckpt.data_cursor["batches_drawn"] == start, ckpt.data_cursor
        writer.truncate_after(start)
        reporter.resumed(start)

    final_loss: float | None = None
    with run, writer:
        tokens_per_step = tc.batch_size * cfg.model.context
        for step in range(start + 1, tc.steps + 1):
            model.train()
            offsets = data_rng.integers(0, len(train_ids) - cfg.model.context - 1, size=tc.batch_size)
            x, y = batch(train_ids, offsets, cfg.model.context)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = float(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            values: dict[str, float] = {"loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                      "probe/python": random.random(), "probe/numpy": float(np.random.random())}
            if step % tc.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    val_logits = model(val_x)
                values["val_loss"] = nn.functional.cross_entropy(val_logits.reshape(-1, vocab),
                                                                 val_y.reshape(-1)).item()
            final_loss = values["loss"]
            writer.log(step, step * tokens_per_step, values)
            reporter.step_done(step)
            if step % tc.checkpoint_every == 0:
                writer.flush()
                save_checkpoint(run.checkpoint_dir, step, states, data_cursor={"batches_drawn": step},
                                generators={"data": data_rng}, keep=tc.keep_checkpoints,
                                on_file_written=reporter.checkpoint_file_callback(step))
                reporter.checkpoint_saved(step)
        writer.flush()
        run.finish("finished", {"final_loss": final_loss})
    return 0


def _data_path(cfg: TrainerConfig) -> Path:
    path = Path(cfg.data)
    return path if path.is_absolute() else REPO / path


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


if __name__ == "__main__":
    sys.exit(main())
