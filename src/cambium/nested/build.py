"""The build loop (the outer loop): a nested model learns its projections and gates on a ContextStream, as a
`BuildTask` on `cambium.core.loop` (runs, resume, device, checkpoints, progress).

Per step: the Conductor's pulse (which CMS levels fire) → observe the stream's chunk `[B, T + 1]` → forward from the
context memory → next-token cross-entropy → backward → frozen levels' gradients into their fp32 buffers, firing
levels get their buffered sums (`OuterGradients`) → under torchrun, the CMS-aware all-reduce (`CmsSync`) → gradient
clip → AdamW step → learning rate (core.schedule's cosine: warm-up, then down to 10 %) → the firing levels' new
memory states become the context memory (detached) → the conductor and the stream advance. Checkpoints hold the
model, optimizer, scheduler, the context memory (`context_memory.pt`), the conductor and the gradient buffers
(`conductor.pt`, `cms_gradients.pt`) and the stream cursor; resuming gives bitwise the same metrics as never stopping
(with `build.threads = 1`).

Metrics: loss, lr, grad_norm, context/document_ends and context/wraps (cumulative boundary events seen by the lanes),
at evaluations val/loss and val/ppl; wall-clock figures under `perf/` (tokens_per_s, step_ms).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint
from cambium.core.config import load
from cambium.core.distributed import DistInfo
from cambium.core.errors import CheckpointError, ConfigError, DataError
from cambium.core.loop import DeviceContext, LoopResult, Task, count_training_flops, open_session, resolve_device
from cambium.core.progress import ProgressReporter, get_logger
from cambium.core.runs import get_run
from cambium.core.schedule import CosineSchedule, LRScheduler
from cambium.data.mixture import read_mixture
from cambium.nested.cms import Conductor, OuterGradients
from cambium.nested.config import NestedConfig
from cambium.nested.model import ContextMemory, NestedLM, lm_loss
from cambium.nested.retrieval import retrieval_accuracy
from cambium.nested.stream import ContextStream
from cambium.nested.sync import CmsSync
from cambium.nn.memory import MemoryState

__all__ = ["BuildTask", "build", "build_model", "evaluate_model", "evaluate_run"]

log = get_logger("cambium.nested.build")


@torch.no_grad()
def evaluate_model(model: NestedLM, root: Path, *, seq_len: int, lanes: int, max_chunks: int | None = None,
                   device: DeviceContext | None = None, carry_memory: bool = True, carry_attention: bool = False
                   ) -> dict[str, float]:
    """Held-out next-token loss and perplexity over the val split, read as `lanes` contiguous streams.

    Each lane starts from the learned initial memory and carries its context memory across chunks, exactly as in a
    build (unless `carry_memory` is off; `carry_attention` carries the attention window too); CMS levels commit their
    memory on their firing chunks, counted by an eval-phase Conductor from the first val chunk. Every model sees the
    same tokens for the same (seq_len, lanes), so losses are comparable across models.
    """
    device = device or DeviceContext(torch.device("cpu"))
    stream = ContextStream(root, split="val", seq_len=seq_len, lanes=lanes)
    chunks = (stream.n_tokens // lanes - 1) // seq_len
    if chunks < 1:
        raise DataError(f"val split of {root} ({stream.n_tokens} tokens) is too short for {lanes} lanes of "
                        f"seq_len={seq_len}")
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    memory = ContextMemory(len(model.blocks), max(1, model.n_levels))
    conductor = Conductor(model.cms.periods, phase="eval")
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(chunks):
        tokens = device.to(stream.observe().tokens)
        with device.autocast():
            logits, states, windows = model(tokens[:, :-1], memory.states if carry_memory else None,
                                            memory.windows if carry_attention else None)
        total += float(lm_loss(logits, tokens[:, 1:]))
        memory.update(states, windows, active=conductor.pulse().active)
        conductor.advance()
        stream.advance()
    model.train(was_training)
    loss = total / chunks
    return {"val/loss": loss, "val/ppl": math.exp(loss), "val/tokens": float(chunks * seq_len * lanes)}


class BuildTask(Task):
    """One outer step of a nested model on its context stream, for `cambium.core.loop`."""

    event_unit = "tokens"

    def __init__(self, cfg: NestedConfig, device: DeviceContext) -> None:
        self.cfg, self.device = cfg, device
        self.label = f"nested {cfg.name}"
        self.root = cfg.context.mixture.out_dir
        vocab = read_mixture(self.root)["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the mixture's tokenizer "
                              f"vocabulary ({vocab}); raise it to at least {vocab}")
        b = cfg.build
        torch.manual_seed(b.seed)
        self.model = build_model(cfg).to(device.device)
        decay = [p for p in self.model.parameters() if p.ndim == 2]
        other = [p for p in self.model.parameters() if p.ndim != 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": b.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=b.lr, betas=(0.9, 0.95))
        # Warm-up from lr/warmup (the first step already moves), then a cosine to 10 % at `steps`.
        schedule = CosineSchedule(lr_max=b.lr, lr_min=0.1 * b.lr, lr_init=b.lr / max(1, b.warmup_steps),
                                  warmup=b.warmup_steps, total=b.steps)
        self.scheduler = LRScheduler(self.optimizer, schedule)
        self.stream = ContextStream(self.root, split="train", seq_len=cfg.context.seq_len,
                                    lanes=cfg.context.batch_size)
        self.memory = ContextMemory(cfg.model.n_blocks, max(1, self.model.n_levels))
        periods = self.model.cms.periods
        self.conductor = Conductor(periods)
        self.outer = OuterGradients([self.model.level_parameters(i) for i in range(len(periods))], periods)
        self.sync: CmsSync | None = None
        self.document_ends, self.wraps = 0, 0
        self.events_per_step = cfg.context.seq_len * cfg.context.batch_size

    def total_steps(self) -> int:
        return self.cfg.build.steps

    def flops_per_step(self) -> float:
        c = self.cfg.context
        tokens = torch.zeros(c.batch_size, c.seq_len + 1, dtype=torch.long, device=self.device.device)

        def loss_of(model: torch.nn.Module) -> torch.Tensor:
            logits, _, _ = model(tokens[:, :-1], None, None)
            return lm_loss(logits, tokens[:, 1:])

        return count_training_flops(self.model, loss_of)

    def parallelize(self, dist: DistInfo) -> None:
        """CMS-aware data parallelism (`nested.sync`): this rank's lanes, all-reduce of the firing levels only."""
        self.sync = CmsSync(dist, self.cfg.context.batch_size)

    def states(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "context_memory": self.memory, "conductor": self.conductor, "cms_gradients": self.outer}

    def cursor(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "document_ends": self.document_ends, "wraps": self.wraps}

    def load_cursor(self, cursor: dict[str, Any]) -> None:
        self.stream.load_state_dict(cursor["stream"])
        self.document_ends, self.wraps = int(cursor["document_ends"]), int(cursor["wraps"])

    def train_step(self, step: int) -> dict[str, float]:
        """One outer step on the stream's current chunk; the stream advances afterwards."""
        b, c = self.cfg.build, self.cfg.context
        pulse = self.conductor.pulse()
        assert pulse.step == step, (pulse.step, step)
        chunk = self.stream.observe()
        rows = self.sync.rows if self.sync is not None else slice(None)
        tokens = self.device.to(chunk.tokens[rows])
        self.model.train()
        memory = _rows(self.memory.states, rows) if c.carry_memory else None
        past = [None if w is None else w[rows] for w in self.memory.windows] if c.carry_attention else None
        with self.device.autocast():
            logits, states, windows = self.model(tokens[:, :-1], memory, past)
            loss = lm_loss(logits, tokens[:, 1:])
        loss.backward()
        self.outer.gate(pulse)
        loss_value = float(loss.detach())
        if self.sync is not None:
            self.sync.reduce_gradients(list(self.model.parameters()))
            loss_value = self.sync.mean(loss)
            states = self.sync.gather_states(states)
            windows = [None if w is None else self.sync.gather_lanes(w.detach()) for w in windows]
        clip = b.grad_clip if b.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step(step + 1)
        self.memory.update(states, windows, active=pulse.active)
        self.conductor.advance()
        self.stream.advance()
        self.document_ends += chunk.count("document_end")
        self.wraps += chunk.count("wrap")
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "context/document_ends": float(self.document_ends), "context/wraps": float(self.wraps)}

    def evaluate(self) -> dict[str, float]:
        c = self.cfg.context
        return evaluate_model(self.model, self.root, seq_len=c.seq_len, lanes=c.batch_size,
                              max_chunks=self.cfg.build.eval_chunks, device=self.device,
                              carry_memory=c.carry_memory, carry_attention=c.carry_attention)


def build_model(cfg: NestedConfig) -> NestedLM:
    """The model `cfg` describes (its CMS levels when it has a memory)."""
    return NestedLM(cfg.model, cfg.context.seq_len, cfg.cms if cfg.model.has_memory else None)


def _rows(states: list[Any], rows: slice) -> list[Any]:
    """Lanes `rows` of the context memory (every tensor is `[B, ...]`)."""
    return [None if block is None else
            [None if s is None else MemoryState(tuple(p[rows] for p in s.params), tuple(o[rows] for o in s.opt))
             for s in block] for block in states]


def build(cfg: NestedConfig, runs_root: Path, *, resume: str | None = None, reporter: ProgressReporter | None = None,
          show_progress: bool = True, measure_peak: bool = False) -> LoopResult:
    """Build `cfg` in a new run under `runs_root`, or continue run `resume` from its latest checkpoint."""
    data_files = [d.path for d in cfg.context.mixture.datasets if d.path.is_file()]
    with open_session(cfg, cfg.build, runs_root, system="nested", name=cfg.name, resume=resume,
                      data_files=data_files, reporter=reporter, show_progress=show_progress,
                      measure_peak=measure_peak) as session:
        result = session.fit(BuildTask(cfg, session.device))
        result.final = {k: v for k, v in result.final.items() if not k.startswith("perf/")}
        session.finish(result.final)
    return result


def evaluate_run(runs_root: Path, run_id: str, *, max_chunks: int | None = None,
                 carry_memory: bool | None = None, retrieval: bool = False, distances: Sequence[int] | None = None,
                 samples: int = 32, seed: int = 0) -> dict[str, float]:
    """Held-out perplexity of the latest checkpoint of a run over its mixture's whole val split (written to
    `<run>/eval.json` too). `carry_memory` overrides the run's `context.carry_memory` (None: keep it). `retrieval`
    adds the passkey and MQAR accuracies by distance (`nested.retrieval`; default distances from seq_len)."""
    record = get_run(runs_root, run_id)
    run_dir = Path(record.dir)
    cfg = load(run_dir / "config.toml", NestedConfig)
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise CheckpointError(f"run {record.id} has no complete checkpoint in {run_dir / 'checkpoints'}")
    if cfg.build.threads:
        torch.set_num_threads(cfg.build.threads)
    device = DeviceContext(resolve_device(cfg.build.device), cfg.build.dtype)
    model = build_model(cfg).to(device.device)
    ckpt = load_checkpoint(path, map_location=device.device)
    ckpt.restore({"model": model}, rng=False)
    c = cfg.context
    values = evaluate_model(model, c.mixture.out_dir, seq_len=c.seq_len, lanes=c.batch_size, max_chunks=max_chunks,
                            device=device,
                            carry_memory=c.carry_memory if carry_memory is None else carry_memory,
                            carry_attention=c.carry_attention)
    if retrieval:
        values.update(retrieval_accuracy(model, c.mixture.out_dir, seq_len=c.seq_len, distances=distances,
                                         samples=samples, seed=seed))
    values["step"] = float(ckpt.step)
    values["parameters"] = float(sum(p.numel() for p in model.parameters()))
    name = "eval.json" if carry_memory is None else f"eval-carry-{str(carry_memory).lower()}.json"
    (run_dir / name).write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    return values
