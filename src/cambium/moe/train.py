"""The MoE trainer: `MoETask` on `cambium.core.loop` (runs, resume, device, checkpoints), every diagnostic of MOE-10
written to the run's DuckDB.

Per optimiser step: `grad_accum` micro-batches of the mixture → loss = LM cross-entropy + the MoE auxiliary losses →
gradient clipping (a non-finite norm skips the step and is counted) → Muon/AdamW step → schedule position moves by the
tokens seen → router biases move by the aux-loss-free rule with the step's loads.

Metrics (names): loss, lm_loss, aux_loss, grad_norm, lr/<group>, skipped_steps; moe/l<i>/{max_over_mean,
router_entropy, dead_experts, bias_absmax}; every `expert_stats_every` steps moe/l<i>/load/e<j> (fraction of the
layer's routed rows) and moe/l<i>/bias/e<j>; at evaluations val/<dataset>/{loss,bpb} and val/{loss,bpb}. Wall-clock
figures (perf/tokens_per_s, perf/mfu, perf/step_ms) carry the `perf/` prefix: they are the only rows a resumed run
does not reproduce bit for bit. Under torchrun the rows above are the global batch's (rank 0 writes them) and every
rank r also writes its own into `metrics.rank<r>.duckdb`: rank<r>/lm_loss (its rows' loss), rank<r>/expert_rows_share
(with expert parallelism: the share of the routed rows its experts computed) and perf/rank<r>/step_ms.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cambium.core.checkpoint import Checkpoint
from cambium.core.distributed import DistInfo
from cambium.core.errors import CheckpointError, ConfigError
from cambium.core.loop import DeviceContext, LoopResult, Task, open_session
from cambium.core.metrics import MetricsWriter
from cambium.core.optim import MuonWithAdamW, ParamGroupSpec, build_optimizer
from cambium.core.progress import ProgressReporter, get_logger
from cambium.core.schedule import LRScheduler
from cambium.data.mixture import MixtureLoader, eval_windows, load_tokenizer, read_mixture
from cambium.data.tokens import TokenShards
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer, flops_per_token, lm_loss
from cambium.moe.parallel import MoEParallel, load_sharded_state, sharded_state
from cambium.nn.moe import bias_gamma

log = get_logger("cambium.moe.train")


def build_model(cfg: MoEConfig) -> MoETransformer:
    """The model of a new run: seeded random weights, or `train.init_from_hf`'s (its architecture checked)."""
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model)
    if cfg.train.init_from_hf is not None:
        from cambium.moe.hf import architecture_mismatch, load_hf

        imported = load_hf(cfg.train.init_from_hf)
        differ = architecture_mismatch(cfg.model, imported.cfg)
        if differ:
            raise ConfigError(f"train.init_from_hf={cfg.train.init_from_hf}: the checkpoint's architecture differs: "
                              f"{'; '.join(differ[:4])}; write the config with `cambium moe import-hf`")
        model.load_state_dict(imported.state_dict())
    return model


def build_optim(cfg: MoEConfig, model: MoETransformer) -> MuonWithAdamW:
    """Groups by `model.param_kind`: embedding, router, expert (AdamW, or Muon per expert with `muon_experts`) and
    dense (Muon for 2-D, AdamW for the rest)."""
    o = cfg.optim
    specs = [
        ParamGroupSpec(name="embedding", lr=o.embedding_lr, weight_decay=o.embedding_weight_decay, betas=o.betas),
        ParamGroupSpec(name="router", lr=o.router_lr, weight_decay=o.router_weight_decay, betas=o.betas),
        ParamGroupSpec(name="expert", lr=o.expert_lr, weight_decay=o.expert_weight_decay, betas=o.betas,
                       stacked=o.muon and o.muon_experts, optimizer="muon" if o.muon and o.muon_experts else "adamw",
                       update_scale="moonlight"),
        ParamGroupSpec(name="dense_matrix", lr=o.dense_lr, weight_decay=o.dense_weight_decay, betas=o.betas,
                       ndims=(2,), optimizer="muon" if o.muon else "adamw", update_scale="moonlight"),
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


class MoETask(Task):
    """One optimiser step of the MoE LM for `cambium.core.loop` (model, optimiser, schedule, mixture loader)."""

    event_unit = "tokens"

    def __init__(self, cfg: MoEConfig, device: DeviceContext) -> None:
        self.cfg, self.device = cfg, device
        self.root = cfg.data.mixture.out_dir
        mixture = read_mixture(self.root)
        vocab = mixture["tokenizer"]["vocab_size"]
        if vocab > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the mixture's tokenizer "
                              f"vocabulary ({vocab}); raise it or use a smaller tokenizer")
        self.label = f"moe {cfg.name}"
        self.model = build_model(cfg).to(device.device)
        self.optimizer = build_optim(cfg, self.model)
        self.scheduler = LRScheduler(self.optimizer, cfg.schedule)
        self.loader = MixtureLoader(self.root, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                    seed=cfg.train.seed)
        self.skipped = 0
        self.events_per_step = cfg.data.seq_len * cfg.data.batch_size
        self.flops_per_token = flops_per_token(self.model, cfg.data.seq_len)
        self.bytes_per_token = self._bytes_per_token()
        self.steps_to_run = cfg.train.max_steps if cfg.train.max_steps is not None else self.total_steps()
        self.parallel: MoEParallel | None = None
        self.rank_metrics: MetricsWriter | None = None  # set by `train` under torchrun
        self._rank_rows_from: int | None = None
        self.forward_model: nn.Module = self.model  # the DDP wrapper once parallelized

    def flops_per_step(self) -> float:
        return self.flops_per_token * self.events_per_step

    def total_steps(self) -> int:
        s = self.cfg.schedule
        return max(1, math.ceil(s.total / self.events_per_step) if s.unit == "tokens" else s.total)

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

    def parallelize(self, dist: DistInfo) -> None:
        """Rows r::W of each global batch on rank r, dense gradients averaged by DDP, and with
        `train.expert_parallel` the routed experts sharded over the ranks (see `cambium.moe.parallel`)."""
        cfg = self.cfg
        if cfg.data.batch_size % (dist.world_size * cfg.data.grad_accum):
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must divide by world_size × data.grad_accum = "
                              f"{dist.world_size} × {cfg.data.grad_accum}: every rank takes an equal share of each "
                              "micro-batch")
        self.parallel = MoEParallel.setup(self.model, dist, expert_parallel=cfg.train.expert_parallel)
        self.forward_model = self.parallel.wrapped
        self.loader = MixtureLoader(self.root, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                    seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size)

    def states(self) -> dict[str, Any]:
        # The tensors of the model and optimiser go to the sharded state (`save_shards`); rank 0's files hold the
        # rest: the schedule and the optimiser's groups (their hyper-parameters).
        return {"scheduler": self.scheduler, "optimizer_groups": _OptimizerGroups(self.optimizer)}

    def save_shards(self, directory: Path) -> bool:
        import torch.distributed.checkpoint as dcp

        if self.rank_metrics is not None:
            self.rank_metrics.flush()
        mesh = self.parallel.mesh if self.parallel is not None else None
        dcp.save(sharded_state(self.model, self.optimizer, mesh), checkpoint_id=str(directory))
        rank = self.parallel.dist.rank if self.parallel is not None else 0
        if rank > 0:  # rank 0's cursor is the checkpoint's cursor.json
            (directory / f"cursor_rank{rank}.json").write_text(json.dumps(self.cursor(), sort_keys=True),
                                                               encoding="utf-8")
        return True

    def restore(self, ckpt: Checkpoint) -> None:
        """Rank 0's files (schedule, optimiser groups, RNG), then every tensor from `shards/` in this process's
        layout (any world size), then this rank's data cursor: cursor.json's on rank 0, `shards/cursor_rank<r>.json`
        on rank r (rank 0's when the world size changed: the ranks draw the same global batches, so its position is
        every rank's)."""
        cursor = ckpt.data_cursor.get("task", {})
        if "model" in ckpt.states:  # written before sharded checkpoints: whole states on rank 0
            ckpt.restore({"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler})
            self.load_cursor(cursor)
            return
        ckpt.restore(self.states())
        shards = ckpt.path / "shards"
        if not shards.is_dir():
            raise CheckpointError(f"{ckpt.path}: shards/ is missing; the checkpoint holds no model")
        mesh = self.parallel.mesh if self.parallel is not None else None
        load_sharded_state(shards, self.model, self.optimizer, mesh)
        world = self.parallel.world_size if self.parallel is not None else 1
        rank = self.parallel.dist.rank if self.parallel is not None else 0
        mine = shards / f"cursor_rank{rank}.json"
        if rank > 0 and mine.is_file():
            try:
                saved = json.loads(mine.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CheckpointError(f"{mine}: not valid JSON: {exc}") from None
            if isinstance(saved, dict) and saved.get("world_size") == world:
                cursor = saved
        self.load_cursor(cursor)

    def cursor(self) -> dict[str, Any]:
        rank, world = (self.parallel.dist.rank, self.parallel.world_size) if self.parallel is not None else (0, 1)
        return {"loader": self.loader.state_dict(), "skipped": self.skipped, "rank": rank, "world_size": world}

    def load_cursor(self, cursor: dict[str, Any]) -> None:
        self.loader.load_state_dict(cursor["loader"])
        self.skipped = int(cursor["skipped"])

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        started = time.perf_counter()
        self.model.train()
        batch = self.device.to(self.loader.next_batch())  # this rank's rows of the global batch
        micro = batch.shape[0] // cfg.data.grad_accum
        loads: list[torch.Tensor] | None = None
        entropies: list[torch.Tensor] = []
        lm_total, aux_total = 0.0, 0.0
        for i in range(cfg.data.grad_accum):
            chunk = batch[i * micro : (i + 1) * micro]
            with self._no_sync(last=i == cfg.data.grad_accum - 1):
                with self.device.autocast():
                    out = self.forward_model(chunk[:, :-1])
                    lm = lm_loss(out.logits, chunk[:, 1:])
                    loss = (lm + out.aux_loss) / cfg.data.grad_accum
                loss.backward()
            lm_total += float(lm.detach()) / cfg.data.grad_accum
            aux_total += float(out.aux_loss.detach()) / cfg.data.grad_accum
            step_loads = [a.load for a in out.moe]
            loads = step_loads if loads is None else [x + y for x, y in zip(loads, step_loads, strict=True)]
            entropies = [a.entropy for a in out.moe] if not entropies else [
                e + a.entropy for e, a in zip(entropies, out.moe, strict=True)]
        if self.parallel is None:
            grad_norm = self.optimizer.clip_grad_norm(cfg.optim.grad_clip)
        else:
            self.parallel.finish_grads(self.model)
            grad_norm = self.parallel.clip_grad_norm(self.model, cfg.optim.grad_clip)
            local_lm = lm_total
            (lm_total, aux_total), loads, entropies = self.parallel.reduce_step([lm_total, aux_total], loads or [],
                                                                                entropies)
            self._log_rank(step, local_lm, loads, started)
        if math.isfinite(grad_norm) and math.isfinite(lm_total):
            self.optimizer.step()
            m = cfg.model.moe
            if m is not None:  # None: every layer dense, no router
                self.model.update_router_biases(loads or [], bias_gamma(step, self.steps_to_run, m.bias_update_rate,
                                                                        m.bias_freeze_fraction))
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        self.scheduler.step(done * self.events_per_step if cfg.schedule.unit == "tokens" else done)
        values = {"loss": lm_total + aux_total, "lm_loss": lm_total, "aux_loss": aux_total,
                  "grad_norm": grad_norm, "skipped_steps": float(self.skipped)}
        values.update({f"lr/{k}": v for k, v in self.optimizer.group_lrs().items()})
        values.update(self._expert_metrics(done, loads or [], [e / cfg.data.grad_accum for e in entropies]))
        return values

    def _log_rank(self, step: int, local_lm: float, loads: list[torch.Tensor], started: float) -> None:
        """This rank's own figures into its `metrics.rank<r>.duckdb` (the registry merges every rank's file): the LM
        loss of its rows, the share of the step's routed rows its experts computed, its step time."""
        writer = self.rank_metrics
        if writer is None or self.parallel is None:
            return
        r, done = self.parallel.dist.rank, step + 1
        if self._rank_rows_from is None:  # first step of this process: rows a killed predecessor logged go
            writer.truncate_after(step)
            self._rank_rows_from = step
        if done % self.cfg.train.log_every:
            return
        values = {f"rank{r}/lm_loss": local_lm, f"perf/rank{r}/step_ms": (time.perf_counter() - started) * 1e3}
        if self.parallel.shard is not None and loads:
            lo, hi = self.parallel.shard.local_range(loads[0].numel())
            total = sum(float(ld.sum()) for ld in loads)
            values[f"rank{r}/expert_rows_share"] = sum(float(ld[lo:hi].sum()) for ld in loads) / max(total, 1.0)
        writer.log(done, done * self.events_per_step, values)

    def _no_sync(self, last: bool) -> AbstractContextManager[Any]:
        """DDP all-reduces the gradients in the backward of the step's last micro-batch only."""
        if self.parallel is None or last:
            return nullcontext()
        no_sync: AbstractContextManager[Any] = self.parallel.wrapped.no_sync()  # type: ignore[operator]
        return no_sync

    def _expert_metrics(self, done: int, loads: list[torch.Tensor], entropies: list[torch.Tensor]
                        ) -> dict[str, float]:
        out: dict[str, float] = {}
        detail = done % self.cfg.train.expert_stats_every == 0
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
                window = self.device.to(window)
                with self.device.autocast():
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


def train(cfg: MoEConfig, runs_root: Path, *, resume: str | None = None, reporter: ProgressReporter | None = None,
          show_progress: bool = True, measure_peak: bool = True) -> LoopResult:
    """Train `cfg` in a new run under `runs_root`, or continue run `resume` from its latest checkpoint."""
    mixture_files = [d.path for d in cfg.data.mixture.datasets if d.path.is_file()]
    with open_session(cfg, cfg.train, runs_root, system="moe", name=cfg.name, resume=resume, data_files=mixture_files,
                      reporter=reporter, show_progress=show_progress, measure_peak=measure_peak) as session:
        task = MoETask(cfg, session.device)
        if session.dist.world_size > 1:
            task.rank_metrics = MetricsWriter(session.run.metrics_path(session.dist.rank), session.run.id)
        try:
            result = session.fit(task)
        finally:
            if task.rank_metrics is not None:
                task.rank_metrics.close()
        result.final = {k: v for k, v in result.final.items() if not k.startswith(("moe/", "lr/"))}
        session.finish(result.final)
    return result


class _OptimizerGroups:
    """The optimiser's state dict without its tensors (they are in the sharded state): group names, kinds and
    hyper-parameters, restored before the tensors."""

    def __init__(self, optimizer: MuonWithAdamW) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        for key in ("adamw", "muon"):
            if state[key] is not None:
                state[key] = {**state[key], "state": {}}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
