"""The build loop (the outer loop): a nested model learns its projections and gates on a ContextStream.

Per step: observe the stream's chunk `[B, T + 1]` → forward from the context memory → next-token cross-entropy →
backward → gradient clip → AdamW step → learning rate (linear warm-up, cosine to 10 %) → the new memory state becomes
the context memory (detached) → the stream advances. Checkpoints hold the model, optimizer, scheduler, the context
memory (`context_memory.pt`) and the stream cursor (`cursor.json`); resuming gives bitwise the same metrics as never
stopping (with `build.threads = 1`).

Metrics: loss, lr, grad_norm, context/document_ends and context/wraps (cumulative boundary events seen by the lanes),
at evaluations val/loss and val/ppl; wall-clock figures under `perf/` (tokens_per_s, step_ms).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cambium.core.config import fingerprint, load
from cambium.core.errors import CheckpointError, ConfigError, DataError
from cambium.core.metrics import MetricsWriter
from cambium.core.progress import get_logger, progress
from cambium.core.runs import Run, create_run, get_run, open_run
from cambium.core.testing import ProgressReporter
from cambium.data.mixture import read_mixture
from cambium.nested.config import NestedConfig
from cambium.nested.model import ContextMemory, NestedLM, lm_loss
from cambium.nested.stream import ContextStream

__all__ = ["BuildResult", "Builder", "build", "evaluate_model", "evaluate_run"]

log = get_logger("cambium.nested.build")


def autocast(dtype: str) -> AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


@torch.no_grad()
def evaluate_model(model: NestedLM, root: Path, *, seq_len: int, lanes: int, max_chunks: int | None = None,
                   dtype: str = "float32", carry_memory: bool = True, carry_attention: bool = False
                   ) -> dict[str, float]:
    """Held-out next-token loss and perplexity over the val split, read as `lanes` contiguous streams.

    Each lane starts from the learned initial memory and carries its context memory across chunks, exactly as in a
    build (unless `carry_memory` is off; `carry_attention` carries the attention window too). Every model sees the
    same tokens for the same (seq_len, lanes), so losses are comparable across models.
    """
    stream = ContextStream(root, split="val", seq_len=seq_len, lanes=lanes)
    chunks = (stream.n_tokens // lanes - 1) // seq_len
    if chunks < 1:
        raise DataError(f"val split of {root} ({stream.n_tokens} tokens) is too short for {lanes} lanes of "
                        f"seq_len={seq_len}")
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    memory = ContextMemory(len(model.levels))
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(chunks):
        tokens = stream.observe().tokens
        with autocast(dtype):
            logits, states, windows = model(tokens[:, :-1], memory.states if carry_memory else None,
                                            memory.windows if carry_attention else None)
        total += float(lm_loss(logits, tokens[:, 1:]))
        memory.update(states, windows)
        stream.advance()
    model.train(was_training)
    loss = total / chunks
    return {"val/loss": loss, "val/ppl": math.exp(loss), "val/tokens": float(chunks * seq_len * lanes)}


def _lr_factor(cfg: NestedConfig) -> Any:
    b = cfg.build

    def factor(step: int) -> float:
        if step < b.warmup_steps:
            return (step + 1) / b.warmup_steps
        span = max(1, b.steps - b.warmup_steps)
        progress_ = min(1.0, (step - b.warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    return factor


@dataclass
class BuildResult:
    run_id: str
    run_dir: Path
    steps: int
    tokens: int
    final: dict[str, float]


class Builder:
    """Builds `cfg` inside `run`; `resume=True` continues from the run's latest checkpoint."""

    def __init__(self, cfg: NestedConfig, run: Run, *, resume: bool, reporter: ProgressReporter | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.reporter = reporter or ProgressReporter(None)
        if cfg.build.threads:
            torch.set_num_threads(cfg.build.threads)
        self.root = cfg.context.mixture.out_dir
        vocab = read_mixture(self.root)["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the mixture's tokenizer "
                              f"vocabulary ({vocab}); raise it to at least {vocab}")
        torch.manual_seed(cfg.build.seed)
        self.model = NestedLM(cfg.model, cfg.context.seq_len)
        decay = [p for p in self.model.parameters() if p.ndim == 2]
        other = [p for p in self.model.parameters() if p.ndim != 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.build.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=cfg.build.lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg))
        self.stream = ContextStream(self.root, split="train", seq_len=cfg.context.seq_len,
                                    lanes=cfg.context.batch_size)
        self.memory = ContextMemory(cfg.model.n_levels)
        self.metrics = MetricsWriter(run.metrics_path(), run.id)
        self.step, self.document_ends, self.wraps = 0, 0, 0
        self.tokens_per_step = cfg.context.seq_len * cfg.context.batch_size
        if resume:
            self._restore()

    def _states(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "context_memory": self.memory}

    def _restore(self) -> None:
        path = latest_checkpoint(self.run.checkpoint_dir)
        if path is None:
            log.info("no checkpoint in %s: starting from step 0", self.run.checkpoint_dir)
            self.metrics.truncate_after(0)
            return
        ckpt = load_checkpoint(path)
        if ckpt.data_cursor.get("config_fingerprint") != fingerprint(self.cfg):
            raise CheckpointError(f"{path} was written with another config; resume with the run's own config.toml")
        ckpt.restore(self._states())
        self.stream.load_state_dict(ckpt.data_cursor["stream"])
        self.step = ckpt.step
        self.document_ends, self.wraps = int(ckpt.data_cursor["document_ends"]), int(ckpt.data_cursor["wraps"])
        # Rows logged after this checkpoint belong to the lost future and are written again.
        self.metrics.truncate_after(self.step)
        self.reporter.resumed(self.step)
        log.info("resumed %s at step %d", self.run.id, self.step)

    def _checkpoint(self) -> None:
        self.metrics.flush()
        cursor = {"stream": self.stream.state_dict(), "document_ends": self.document_ends, "wraps": self.wraps,
                  "config_fingerprint": fingerprint(self.cfg)}
        save_checkpoint(self.run.checkpoint_dir, self.step, self._states(), data_cursor=cursor,
                        keep=self.cfg.build.keep_checkpoints,
                        on_file_written=self.reporter.checkpoint_file_callback(self.step))
        self.reporter.checkpoint_saved(self.step)

    def build_step(self) -> dict[str, float]:
        """One outer step on the stream's current chunk; the stream advances afterwards."""
        b = self.cfg.build
        chunk = self.stream.observe()
        self.model.train()
        with autocast(b.dtype):
            c = self.cfg.context
            logits, states, windows = self.model(chunk.tokens[:, :-1], self.memory.states if c.carry_memory else None,
                                                 self.memory.windows if c.carry_attention else None)
            loss = lm_loss(logits, chunk.tokens[:, 1:])
        loss.backward()
        clip = b.grad_clip if b.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.memory.update(states, windows)
        self.stream.advance()
        self.step += 1
        self.document_ends += chunk.count("document_end")
        self.wraps += chunk.count("wrap")
        return {"loss": float(loss.detach()), "lr": lr, "grad_norm": grad_norm,
                "context/document_ends": float(self.document_ends), "context/wraps": float(self.wraps)}

    def evaluate(self) -> dict[str, float]:
        c = self.cfg.context
        return evaluate_model(self.model, self.root, seq_len=c.seq_len, lanes=c.batch_size,
                              max_chunks=self.cfg.build.eval_chunks, dtype=self.cfg.build.dtype,
                              carry_memory=c.carry_memory, carry_attention=c.carry_attention)

    def fit(self, show_progress: bool = True) -> BuildResult:
        b = self.cfg.build
        self.reporter.run_started(self.run.id)
        final: dict[str, float] = {}
        bar_ctx = progress(f"nested {self.cfg.name}", total=b.steps, unit="step") if show_progress else nullcontext()
        with bar_ctx as bar:
            if bar is not None:
                bar.advance(self.step)
            while self.step < b.steps:
                t0 = time.perf_counter()
                values = self.build_step()
                elapsed = time.perf_counter() - t0
                last = self.step == b.steps
                if self.step % b.log_every == 0 or last:
                    values["perf/tokens_per_s"] = self.tokens_per_step / elapsed
                    values["perf/step_ms"] = elapsed * 1e3
                    if self.step % b.eval_every == 0 or last:
                        values.update(self.evaluate())
                    self.metrics.log(self.step, self.step * self.tokens_per_step, values)
                    final.update(values)
                if bar is not None:
                    bar.advance()
                    bar.set(loss=values["loss"])
                if self.step % b.checkpoint_every == 0 or last:
                    self._checkpoint()
                self.reporter.step_done(self.step)
        self.metrics.close()
        summary = {k: v for k, v in final.items() if not k.startswith("perf/")}
        self.run.finish("finished", summary=summary)
        return BuildResult(self.run.id, self.run.dir, self.step, self.step * self.tokens_per_step, summary)


def build(cfg: NestedConfig, runs_root: Path, *, resume: str | None = None, reporter: ProgressReporter | None = None,
          show_progress: bool = True) -> BuildResult:
    """Build `cfg` in a new run under `runs_root`, or continue run `resume` from its latest checkpoint."""
    data_files = [d.path for d in cfg.context.mixture.datasets if d.path.is_file()]
    if resume is None:
        run = create_run(runs_root, system="nested", name=cfg.name, config=cfg, seed=cfg.build.seed,
                         data_files=data_files)
    else:
        run = open_run(runs_root, resume, config=cfg)
    with run:
        return Builder(cfg, run, resume=resume is not None, reporter=reporter).fit(show_progress=show_progress)


def evaluate_run(runs_root: Path, run_id: str, *, max_chunks: int | None = None,
                 carry_memory: bool | None = None) -> dict[str, float]:
    """Held-out perplexity of the latest checkpoint of a run over its mixture's whole val split (written to
    `<run>/eval.json` too). `carry_memory` overrides the run's `context.carry_memory` (None: keep it)."""
    record = get_run(runs_root, run_id)
    run_dir = Path(record.dir)
    cfg = load(run_dir / "config.toml", NestedConfig)
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"run {record.id} has no complete checkpoint in {run_dir / 'checkpoints'}")
    if cfg.build.threads:
        torch.set_num_threads(cfg.build.threads)
    model = NestedLM(cfg.model, cfg.context.seq_len)
    ckpt = load_checkpoint(path)
    ckpt.restore({"model": model}, rng=False)
    c = cfg.context
    values = evaluate_model(model, c.mixture.out_dir, seq_len=c.seq_len, lanes=c.batch_size, max_chunks=max_chunks,
                            dtype=cfg.build.dtype,
                            carry_memory=c.carry_memory if carry_memory is None else carry_memory,
                            carry_attention=c.carry_attention)
    values["step"] = float(ckpt.step)
    values["parameters"] = float(sum(p.numel() for p in model.parameters()))
    name = "eval.json" if carry_memory is None else f"eval-carry-{str(carry_memory).lower()}.json"
    (run_dir / name).write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    return values
