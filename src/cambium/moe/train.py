"""The MoE trainer: one process, exact resume, every diagnostic of MOE-10 written to the run's DuckDB.

Per optimiser step: `grad_accum` micro-batches of the mixture → loss = LM cross-entropy + the MoE auxiliary losses →
gradient clipping (a non-finite norm skips the step and is counted) → Muon/AdamW step → schedule position moves by the
tokens seen → router biases move by the aux-loss-free rule with the step's loads.

Metrics (names): loss, lm_loss, aux_loss, grad_norm, lr/<group>, skipped_steps; moe/l<i>/{max_over_mean,
router_entropy, dead_experts, bias_absmax}; every `expert_stats_every` steps moe/l<i>/load/e<j> (fraction of the
layer's routed rows) and moe/l<i>/bias/e<j>; at evaluations val/<dataset>/{loss,bpb} and val/{loss,bpb}. Wall-clock
figures (perf/tokens_per_s, perf/mfu, perf/step_ms) carry the `perf/` prefix: they are the only rows a resumed run
does not reproduce bit for bit.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cambium.core.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from cambium.core.config import fingerprint
from cambium.core.doctor import DevicePeak, load_or_measure_peak
from cambium.core.errors import CheckpointError, ConfigError
from cambium.core.metrics import MetricsWriter
from cambium.core.optim import MuonWithAdamW, ParamGroupSpec, build_optimizer
from cambium.core.progress import get_logger, progress
from cambium.core.runs import Run, create_run, open_run
from cambium.core.schedule import LRScheduler
from cambium.core.testing import ProgressReporter
from cambium.data.mixture import MixtureLoader, eval_windows, load_tokenizer, read_mixture
from cambium.data.tokens import TokenShards
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer, flops_per_token, lm_loss
from cambium.nn.moe import bias_gamma

log = get_logger("cambium.moe.train")


def build_model(cfg: MoEConfig) -> MoETransformer:
    torch.manual_seed(cfg.train.seed)
    return MoETransformer(cfg.model)


def build_optim(cfg: MoEConfig, model: MoETransformer) -> MuonWithAdamW:
    """Groups by `model.param_kind`: embedding, router, expert (AdamW, or Muon per expert with `muon_experts`) and
    dense (Muon for 2-D, AdamW for the rest)."""
    o = cfg.optim
    wd = o.weight_decay
    specs = [
        ParamGroupSpec(name="embedding", lr=o.embedding_lr, weight_decay=0.0, betas=o.betas),
        ParamGroupSpec(name="router", lr=o.router_lr, weight_decay=0.0, betas=o.betas),
        ParamGroupSpec(name="expert", lr=o.expert_lr, weight_decay=wd, betas=o.betas, stacked=o.muon and o.muon_experts,
                       optimizer="muon" if o.muon and o.muon_experts else "adamw", update_scale="moonlight"),
        ParamGroupSpec(name="dense_matrix", lr=o.dense_lr, weight_decay=wd, betas=o.betas, ndims=(2,),
                       optimizer="muon" if o.muon else "adamw", update_scale="moonlight"),
        ParamGroupSpec(name="dense_other", lr=o.dense_lr, weight_decay=0.0, betas=o.betas),
    ]
    kind = model.param_kind
    predicates = {
        "embedding": lambda n, p: kind(n) == "embedding",
        "router": lambda n, p: kind(n) == "router",
        "expert": lambda n, p: kind(n) == "expert",
        "dense_matrix": lambda n, p: kind(n) == "dense" and p.ndim == 2,
        "dense_other": lambda n, p: kind(n) == "dense" and p.ndim != 2,
    }
    return build_optimizer(model, specs, predicates, allow_empty=True)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    steps: int
    tokens: int
    final: dict[str, float]


class Trainer:
    def __init__(self, cfg: MoEConfig, run: Run, *, resume: bool, reporter: ProgressReporter | None = None,
                 peak: DevicePeak | None = None) -> None:
        self.cfg, self.run = cfg, run
        self.reporter = reporter or ProgressReporter(None)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.root = cfg.data.mixture.out_dir
        mixture = read_mixture(self.root)
        vocab = mixture["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the mixture's tokenizer "
                              f"vocabulary ({vocab}); raise it or use a smaller tokenizer")
        self.model = build_model(cfg)
        self.optimizer = build_optim(cfg, self.model)
        self.scheduler = LRScheduler(self.optimizer, cfg.schedule)
        self.loader = MixtureLoader(self.root, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                    seed=cfg.train.seed)
        self.metrics = MetricsWriter(run.metrics_path(), run.id)
        self.step, self.tokens, self.skipped = 0, 0, 0
        self.tokens_per_step = cfg.data.seq_len * cfg.data.batch_size
        self.total_steps = self._total_steps()
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        self.peak = peak
        self.bytes_per_token = self._bytes_per_token()
        if resume:
            self._restore()

    def _total_steps(self) -> int:
        s = self.cfg.schedule
        steps = math.ceil(s.total / self.tokens_per_step) if s.unit == "tokens" else s.total
        if self.cfg.train.max_steps is not None:
            steps = min(steps, self.cfg.train.max_steps)
        return max(1, steps)

    def _bytes_per_token(self) -> dict[str, float]:
        """UTF-8 bytes per token of each validation split (end-of-text tokens excluded), for bits-per-byte."""
        tok = load_tokenizer(self.root)
        out = {}
        for name in self.loader.names:
            shards = TokenShards(self.root / name / "val")
            ids = shards.read(0, len(shards))
            text_ids = ids[ids != tok.eot_id].tolist()
            out[name] = len(tok.decode(text_ids).encode("utf-8")) / max(1, len(text_ids))
        return out

    def _restore(self) -> None:
        path = latest_checkpoint(self.run.checkpoint_dir)
        if path is None:
            log.info("no checkpoint in %s: starting from step 0", self.run.checkpoint_dir)
            self.metrics.truncate_after(0)
            return
        ckpt = load_checkpoint(path)
        # Before any state is loaded: another config's tensors would fail on shapes with a less useful message.
        if ckpt.data_cursor.get("config_fingerprint") != fingerprint(self.cfg):
            raise CheckpointError(f"{path} was written with another config; resume with the run's own config.toml")
        ckpt.restore({"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler})
        self.loader.load_state_dict(ckpt.data_cursor["loader"])
        self.step, self.tokens = ckpt.step, int(ckpt.data_cursor["tokens"])
        self.skipped = int(ckpt.data_cursor["skipped"])
        # Rows logged after this checkpoint belong to the lost future and are written again.
        self.metrics.truncate_after(self.step)
        self.reporter.resumed(self.step)
        log.info("resumed %s at step %d (%d tokens)", self.run.id, self.step, self.tokens)

    def _checkpoint(self) -> None:
        self.metrics.flush()
        cursor = {"loader": self.loader.state_dict(), "tokens": self.tokens, "skipped": self.skipped,
                  "config_fingerprint": fingerprint(self.cfg)}
        save_checkpoint(self.run.checkpoint_dir, self.step,
                        {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler},
                        data_cursor=cursor, keep=self.cfg.train.keep_checkpoints,
                        on_file_written=self.reporter.checkpoint_file_callback(self.step))
        self.reporter.checkpoint_saved(self.step)

    def _autocast(self) -> Any:
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        micro = cfg.data.batch_size // cfg.data.grad_accum
        batch = self.loader.next_batch()
        loads: list[torch.Tensor] | None = None
        entropies: list[torch.Tensor] = []
        lm_total, aux_total = 0.0, 0.0
        for i in range(cfg.data.grad_accum):
            chunk = batch[i * micro : (i + 1) * micro]
            with self._autocast():
                out = self.model(chunk[:, :-1])
                lm = lm_loss(out.logits, chunk[:, 1:])
                loss = (lm + out.aux_loss) / cfg.data.grad_accum
            loss.backward()
            lm_total += float(lm.detach()) / cfg.data.grad_accum
            aux_total += float(out.aux_loss.detach()) / cfg.data.grad_accum
            step_loads = [a.load for a in out.moe]
            loads = step_loads if loads is None else [x + y for x, y in zip(loads, step_loads, strict=True)]
            entropies = [a.entropy for a in out.moe] if not entropies else [
                e + a.entropy for e, a in zip(entropies, out.moe, strict=True)]
        grad_norm = self.optimizer.clip_grad_norm(cfg.optim.grad_clip)
        if math.isfinite(grad_norm) and math.isfinite(lm_total):
            self.optimizer.step()
            gamma = bias_gamma(self.step, self.total_steps, cfg.model.moe.bias_update_rate,
                               cfg.model.moe.bias_freeze_fraction)
            self.model.update_router_biases(loads or [], gamma)
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.scheduler.step(self.tokens if cfg.schedule.unit == "tokens" else self.step)
        values = {"loss": lm_total + aux_total, "lm_loss": lm_total, "aux_loss": aux_total,
                  "grad_norm": grad_norm, "skipped_steps": float(self.skipped)}
        values.update({f"lr/{k}": v for k, v in self.optimizer.group_lrs().items()})
        values.update(self._expert_metrics(loads or [], [e / cfg.data.grad_accum for e in entropies]))
        return values

    def _expert_metrics(self, loads: list[torch.Tensor], entropies: list[torch.Tensor]) -> dict[str, float]:
        out: dict[str, float] = {}
        detail = self.step % self.cfg.train.expert_stats_every == 0
        for i, (layer, load, ent) in enumerate(zip(self.model.moe_layers(), loads, entropies, strict=True)):
            lf = load.double()
            total = float(lf.sum())
            out[f"moe/l{i}/max_over_mean"] = float(lf.max() / lf.mean()) if total > 0 else 0.0
            out[f"moe/l{i}/dead_experts"] = float((load == 0).sum())
            out[f"moe/l{i}/router_entropy"] = float(ent)
            bias = layer.router.bias
            out[f"moe/l{i}/bias_absmax"] = float(bias.abs().max())
            if detail:
                for e in range(load.numel()):
                    out[f"moe/l{i}/load/e{e}"] = float(lf[e] / total) if total > 0 else 0.0
                    out[f"moe/l{i}/bias/e{e}"] = float(bias[e])
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out: dict[str, float] = {}
        losses, weights = [], []
        for name in self.loader.names:
            total, count = 0.0, 0
            for window in eval_windows(self.root, name, seq_len=self.cfg.data.seq_len,
                                       max_windows=self.cfg.train.eval_windows):
                with self._autocast():
                    logits = self.model(window[None, :-1]).logits
                total += float(lm_loss(logits, window[None, 1:])) * (window.numel() - 1)
                count += window.numel() - 1
            if count == 0:
                continue
            loss = total / count
            out[f"val/{name}/loss"] = loss
            out[f"val/{name}/bpb"] = loss / math.log(2) / self.bytes_per_token[name]
            losses.append(loss)
            weights.append(count)
        if losses:
            mean = sum(x * w for x, w in zip(losses, weights, strict=True)) / sum(weights)
            out["val/loss"] = mean
            out["val/bpb"] = sum(out[f"val/{n}/bpb"] * w for n, w in zip(self.loader.names, weights, strict=True)
                                 ) / sum(weights)
        return out

    def fit(self, show_progress: bool = True) -> TrainResult:
        cfg = self.cfg.train
        self.reporter.run_started(self.run.id)
        final: dict[str, float] = {}
        bar_ctx = progress(f"moe {self.cfg.name}", total=self.total_steps, unit="step") if show_progress \
            else nullcontext()
        with bar_ctx as bar:
            if bar is not None:
                bar.advance(self.step)
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                values = self.train_step()
                elapsed = time.perf_counter() - t0
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    tps = self.tokens_per_step / elapsed
                    values["perf/tokens_per_s"] = tps
                    values["perf/step_ms"] = elapsed * 1e3
                    if self.peak is not None:
                        values["perf/mfu"] = self.peak.mfu(tps * self.flops_per_token)
                    if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                        values.update(self.evaluate())
                    self.metrics.log(self.step, self.tokens, values)
                    final.update(values)
                if bar is not None:
                    bar.advance()
                    bar.set(loss=values["loss"])
                if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self._checkpoint()
                self.reporter.step_done(self.step)
        self.metrics.close()
        summary = {k: v for k, v in final.items() if not k.startswith(("moe/", "lr/"))}
        self.run.finish("finished", summary=summary)
        return TrainResult(self.run.id, self.run.dir, self.step, self.tokens, summary)


def train(cfg: MoEConfig, runs_root: Path, *, resume: str | None = None, reporter: ProgressReporter | None = None,
          show_progress: bool = True, measure_peak: bool = True) -> TrainResult:
    """Train `cfg` in a new run under `runs_root`, or continue run `resume` from its latest checkpoint."""
    mixture_files = [d.path for d in cfg.data.mixture.datasets if d.path.is_file()]
    if resume is None:
        run = create_run(runs_root, system="moe", name=cfg.name, config=cfg, seed=cfg.train.seed,
                         data_files=mixture_files)
    else:
        run = open_run(runs_root, resume, config=cfg)
    with run:
        # The peak depends on the thread count: set it before the peak is looked up (or measured).
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        peak = load_or_measure_peak(runs_root) if measure_peak else None
        trainer = Trainer(cfg, run, resume=resume is not None, reporter=reporter, peak=peak)
        return trainer.fit(show_progress=show_progress)
