"""`cambium worldmodel pipeline`: one run, five phases, exact resume.

    1 import    kline files → candle store (validated, gap report) → chronological split with embargo
    2 strate1   train the FSQ tokenizer on the training window                  (checkpointed, resumable)
    3 tokenize  codes of every segment on the fixed patch grid → <run>/codes/  (+ codebook usage, hold-out recon loss)
    4 strate2   train the Mamba-2 JEPA on windows of pretokenized training codes (checkpointed, resumable)
    5 evaluate  linear probes on the hold-out (WM-7) → <run>/report/

Every phase logs into the run's metrics.duckdb at its own global steps, so that `truncate_after` on resume never
touches another phase's rows: phase 1 at step 1, phase 2 at 2 … S1 + 1, phase 3 at S1 + 2, phase 4 at S1 + 3 …
S1 + 2 + S2, phase 5 at S1 + S2 + 3. Names carry the phase (`import/`, `tokenizer/`, `pretokenize/`, `jepa/`,
`probe/`); wall-clock figures go under `perf/`. A phase starts from fixed seeds (seed · 100 + phase), so running it
in a fresh process or after the earlier phases in one process gives the same numbers. `phases.json` lists the phases
done; a resumed run continues with the first phase not done (from the phase's latest checkpoint when it trains).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cambium.core.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from cambium.core.config import fingerprint
from cambium.core.errors import CheckpointError, ConfigError, RunError
from cambium.core.metrics import MetricsWriter
from cambium.core.progress import get_logger, progress
from cambium.core.runs import Run, create_run, open_run
from cambium.core.testing import ProgressReporter
from cambium.worldmodel.config import WorldModelConfig
from cambium.worldmodel.data import (
    Split,
    chronological_split,
    holdout_part,
    import_candles,
    kline_files,
    load_segments,
    train_part,
)
from cambium.worldmodel.evaluation import CodedSeries, probe_dataset, run_probes
from cambium.worldmodel.features import CandleBatch, clock_features
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.tokenizer import FSQTokenizer
from cambium.worldmodel.training import CandleSeries, JEPASteps, TokenizerSteps, sample_windows

__all__ = ["PHASES", "Pipeline", "PipelineResult", "RunArtifacts", "phase_steps", "run_pipeline"]

log = get_logger("cambium.worldmodel.pipeline")
PHASES = {1: "import", 2: "strate1", 3: "tokenize", 4: "strate2", 5: "evaluate"}


def phase_steps(cfg: WorldModelConfig) -> dict[int, tuple[int, int]]:
    """(first, last) global metric step of each phase."""
    s1, s2 = cfg.train_tokenizer.steps, cfg.train_jepa.steps
    return {1: (1, 1), 2: (2, s1 + 1), 3: (s1 + 2, s1 + 2), 4: (s1 + 3, s1 + 2 + s2), 5: (s1 + s2 + 3, s1 + s2 + 3)}


@dataclass
class PipelineResult:
    run_id: str
    run_dir: Path
    phases_done: list[int]
    summary: dict[str, float]


def _atomic_bytes(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"

    def write(p: Path) -> None:
        p.write_text(text, encoding="utf-8")

    _atomic_bytes(path, write)


def load_coded(run_dir: Path, segments: list[CandleSeries], patch_length: int) -> list[CodedSeries]:
    """The pretokenized codes of phase 3, joined with their candle segments."""
    index = json.loads((run_dir / "codes" / "index.json").read_text(encoding="utf-8"))
    by_name = {s.name: s for s in segments}
    out = []
    for entry in index["segments"]:
        codes = torch.from_numpy(np.load(run_dir / "codes" / entry["file"]).astype(np.int64))
        out.append(CodedSeries(by_name[entry["name"]], codes, int(entry["offset"]), patch_length))
    return out


def n_train_patches(cs: CodedSeries, split: Split) -> int:
    """Patches of `cs` whose bars all lie in the training window."""
    ends = cs.series.open_time_ms[cs.end_bar(torch.arange(cs.codes.shape[0]))]
    return int((ends < split.split_ms).sum())


def code_batch_fn(coded: list[CodedSeries], split: Split, seq_len: int,
                  batch_size: int) -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    """Random windows of seq_len pretokenized training codes with their clock features."""
    usable = [(cs, n) for cs in coded if (n := n_train_patches(cs, split)) >= seq_len]
    if not usable:
        raise ConfigError(f"jepa.seq_len={seq_len} patches do not fit in any segment's training window; lower it")

    def batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        which = torch.randint(len(usable), (batch_size,), generator=generator).tolist()
        idx, ohlcv, times = [], [], []
        for i in which:
            cs, n = usable[i]
            first = int(torch.randint(n - seq_len + 1, (1,), generator=generator))
            idx.append(cs.codes[first : first + seq_len])
            o, t = cs.window_bars(first, seq_len)
            ohlcv.append(o)
            times.append(t)
        candles = CandleBatch(torch.stack(ohlcv), torch.stack(times))
        return torch.stack(idx), clock_features(candles, coded[0].patch_length)

    return batch


class RunArtifacts:
    """What the phases leave in a run directory, loaded back: segments and split, tokenizer, JEPA, codes, probes."""

    def __init__(self, run_dir: Path, cfg: WorldModelConfig) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.store_root = Path(cfg.data.store_dir) if cfg.data.store_dir else run_dir / "store"
        self._segments: list[CandleSeries] | None = None
        self._split: Split | None = None

    def segments(self) -> tuple[list[CandleSeries], Split]:
        if self._segments is None or self._split is None:
            info = json.loads((self.run_dir / "data" / "import.json").read_text(encoding="utf-8"))
            self._segments = load_segments(self.store_root, self.cfg.data, sorted(info["symbols"]))
            self._split = Split(**info["split"])
        return self._segments, self._split

    def load_tokenizer(self) -> FSQTokenizer:
        tokenizer = FSQTokenizer(self.cfg.tokenizer)
        tokenizer.load_state_dict(torch.load(self.run_dir / "tokenizer.pt", weights_only=True))
        return tokenizer.eval()

    def load_jepa(self) -> WorldModelJEPA:
        model = WorldModelJEPA(self.cfg.jepa, self.load_tokenizer())
        model.load_state_dict(torch.load(self.run_dir / "jepa.pt", weights_only=True))
        return model.eval()

    def coded(self) -> list[CodedSeries]:
        return load_coded(self.run_dir, self.segments()[0], self.cfg.tokenizer.patch_length)

    def probes(self, model: WorldModelJEPA | None = None) -> dict[str, Any]:
        """Phase 5's probe numbers computed from the run's files."""
        _, split = self.segments()
        data = probe_dataset(model or self.load_jepa(), self.coded(), split, self.cfg.evaluation)
        return run_probes(data, self.cfg.evaluation)


class Pipeline(RunArtifacts):
    """The phases of one run (see the module docstring)."""

    def __init__(self, cfg: WorldModelConfig, run: Run, *, resumed: bool, reporter: ProgressReporter,
                 show_progress: bool, restart_phase: int | None = None) -> None:
        super().__init__(run.dir, cfg)
        self.run, self.reporter, self.show_progress = run, reporter, show_progress
        self.resumed = resumed
        self.restart_phase = restart_phase  # a phase rerun from scratch even if it has checkpoints
        self.steps = phase_steps(cfg)
        self.writer = MetricsWriter(run.metrics_path(), run.id)
        self.summary: dict[str, float] = {}
        self._announced_resume = False

    # -- state of the run ------------------------------------------------------------------------------------------
    @property
    def phases_path(self) -> Path:
        return self.run.dir / "phases.json"

    def done(self) -> list[int]:
        if not self.phases_path.exists():
            return []
        return list(json.loads(self.phases_path.read_text(encoding="utf-8"))["done"])

    def _mark(self, phase: int) -> None:
        self.writer.flush()
        _write_json(self.phases_path, {"done": sorted({*[p for p in self.done() if p < phase], phase})})

    def _unmark_from(self, phase: int) -> None:
        _write_json(self.phases_path, {"done": [p for p in self.done() if p < phase]})

    def _seed(self, phase: int) -> torch.Generator:
        torch.manual_seed(self.cfg.seed * 100 + phase)
        return torch.Generator().manual_seed(self.cfg.seed * 100 + phase)

    def _log(self, step: int, events: int, values: dict[str, float]) -> None:
        self.writer.log(step, events, values)
        self.summary.update({k: v for k, v in values.items() if not k.startswith("perf/")})
        self.reporter.step_done(step)

    def _fresh_phase(self, phase: int) -> None:
        """Forget everything a previous attempt at `phase` (or a later phase) left: rows and checkpoints."""
        first = self.steps[phase][0]
        self.writer.truncate_after(first - 1)
        for path in list_checkpoints(self.run.checkpoint_dir):
            if int(path.name.split("_")[1]) >= first:
                shutil.rmtree(path)
        self._announce(first - 1)

    def _announce(self, step: int) -> None:
        if self.resumed and not self._announced_resume:
            self._announced_resume = True
            self.reporter.resumed(step)

    # -- phases ----------------------------------------------------------------------------------------------------
    def phase_import(self) -> None:
        self._fresh_phase(1)
        t0 = time.perf_counter()
        report = import_candles(self.cfg.data, self.store_root, merge=self.cfg.data.store_dir is not None)
        segments = load_segments(self.store_root, self.cfg.data, sorted(report.symbols))
        split = chronological_split(segments, self.cfg.evaluation, self.cfg.data.interval)
        train = sum(int((s.open_time_ms < split.split_ms).sum()) for s in segments)
        hold = sum(int((s.open_time_ms >= split.holdout_ms).sum()) for s in segments)
        _write_json(self.run.dir / "data" / "import.json", {**report.to_json(), "split": split.__dict__,
                                                            "segments": len(segments)})
        self._segments, self._split = segments, split
        self._log(self.steps[1][0], report.rows, {
            "import/symbols": len(report.symbols), "import/rows": report.rows, "import/segments": len(segments),
            "import/rejected_files": len(report.rejected), "import/gaps": report.gaps,
            "import/train_bars": train, "import/holdout_bars": hold, "perf/import/seconds": time.perf_counter() - t0,
        })
        self._mark(1)

    def _train(self, phase: int, prefix: str, steps_obj: TokenizerSteps | JEPASteps, total: int,
               events_per_step: int) -> None:
        first, _ = self.steps[phase]
        start = 0
        path = latest_checkpoint(self.run.checkpoint_dir) if self.resumed and phase != self.restart_phase else None
        ckpt = load_checkpoint(path) if path is not None else None
        if ckpt is not None and ckpt.data_cursor.get("phase") == phase:
            if ckpt.data_cursor.get("config_fingerprint") != fingerprint(self.cfg):
                raise CheckpointError(f"{path} was written with another config; resume with the run's config.toml")
            ckpt.restore(steps_obj.state())
            start = int(ckpt.data_cursor["phase_step"])
            self.writer.truncate_after(first - 1 + start)
            self._announce(first - 1 + start)
            log.info("resumed %s phase %d at step %d", self.run.id, phase, start)
        else:
            self._fresh_phase(phase)
        every = self.cfg.pipeline.checkpoint_every
        bar_ctx = progress(f"worldmodel {prefix}", total=total, unit="step") if self.show_progress else nullcontext()
        with bar_ctx as bar:
            if bar is not None:
                bar.advance(start)
            for i in range(start, total):
                t0 = time.perf_counter()
                row = steps_obj.step(i)
                values = {f"{prefix}/{k}": v for k, v in row.items()}
                values[f"perf/{prefix}/step_ms"] = (time.perf_counter() - t0) * 1e3
                done = i + 1
                if done % self.cfg.pipeline.log_every == 0 or done == total:
                    self.writer.log(first - 1 + done, done * events_per_step, values)
                    self.summary.update({k: v for k, v in values.items() if not k.startswith("perf/")})
                if bar is not None:
                    bar.advance()
                    bar.set(loss=row["loss"])
                if done % every == 0 or done == total:
                    self.writer.flush()
                    g = first - 1 + done
                    save_checkpoint(self.run.checkpoint_dir, g, steps_obj.state(),
                                    data_cursor={"phase": phase, "phase_step": done,
                                                 "config_fingerprint": fingerprint(self.cfg)},
                                    keep=self.cfg.pipeline.keep_checkpoints,
                                    on_file_written=self.reporter.checkpoint_file_callback(g))
                    self.reporter.checkpoint_saved(g)
                self.reporter.step_done(first - 1 + done)

    def phase_strate1(self) -> None:
        segments, split = self.segments()
        gen = self._seed(2)
        tokenizer = FSQTokenizer(self.cfg.tokenizer)
        p = self.cfg.pipeline.tokenizer_window_patches
        train = train_part(segments, split, p * self.cfg.tokenizer.patch_length)
        steps = TokenizerSteps(tokenizer, train, self.cfg.train_tokenizer, gen, p)
        bars = p * self.cfg.tokenizer.patch_length * self.cfg.train_tokenizer.batch_size
        self._train(2, "tokenizer", steps, self.cfg.train_tokenizer.steps, bars)
        _atomic_bytes(self.run.dir / "tokenizer.pt", lambda f: torch.save(tokenizer.state_dict(), f))
        self._mark(2)

    @torch.no_grad()
    def phase_tokenize(self) -> None:
        self._fresh_phase(3)
        self._seed(3)
        t0 = time.perf_counter()
        segments, split = self.segments()
        tokenizer = self.load_tokenizer()
        patch = self.cfg.tokenizer.patch_length
        out_dir = self.run.dir / "codes"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir()
        entries: list[dict[str, Any]] = []
        train_codes: list[Tensor] = []
        hold_codes: list[Tensor] = []
        for i, s in enumerate(segments):
            if s.ohlcv.shape[0] < patch:
                continue
            codes = tokenizer.tokenize(s.ohlcv.float().unsqueeze(0))[0]
            offset = s.ohlcv.shape[0] % patch
            file = f"{i:04d}_{s.name}.npy"
            _save_npy(out_dir / file, codes.numpy().astype(np.int16))
            entries.append({"name": s.name, "file": file, "offset": offset, "patches": int(codes.shape[0]),
                            "first_open_time": int(s.open_time_ms[offset])})
            cs = CodedSeries(s, codes, offset, patch)
            ends = s.open_time_ms[cs.end_bar(torch.arange(codes.shape[0]))]
            train_codes.append(codes[ends < split.split_ms])
            hold_codes.append(codes[ends - (patch - 1) * _bar_ms(s) >= split.holdout_ms])
        _write_json(out_dir / "index.json", {"patch_length": patch, "codebook_size": tokenizer.codebook_size,
                                             "segments": entries})
        values: dict[str, float] = {"pretokenize/segments": len(entries),
                                    "pretokenize/codes": sum(e["patches"] for e in entries)}
        all_codes = [torch.from_numpy(np.load(out_dir / e["file"]).astype(np.int64)) for e in entries]
        for name, codes_list in (("train", train_codes), ("holdout", hold_codes), ("all", all_codes)):
            codes = torch.cat(codes_list) if codes_list else torch.zeros(0, dtype=torch.long)
            values[f"pretokenize/patches/{name}"] = codes.numel()
            if codes.numel():
                for k, v in tokenizer.code_stats(codes).items():
                    values[f"tokenizer/{k}/{name}"] = v
        values["tokenizer/holdout_loss"] = self._holdout_recon_loss(tokenizer, segments, split)
        values["perf/pretokenize/seconds"] = time.perf_counter() - t0
        self._log(self.steps[3][0], int(values["pretokenize/codes"]) * patch, values)
        self._mark(3)

    def _holdout_recon_loss(self, tokenizer: FSQTokenizer, segments: list[CandleSeries], split: Split) -> float:
        bars = self.cfg.pipeline.tokenizer_window_patches * self.cfg.tokenizer.patch_length
        hold = holdout_part(segments, split, bars)
        if not hold:
            return float("nan")
        gen = torch.Generator().manual_seed(self.cfg.seed * 100 + 31)
        batch = sample_windows(hold, bars, 256, gen)
        return float(tokenizer(batch.ohlcv).loss)

    def phase_strate2(self) -> None:
        segments, split = self.segments()
        tokenizer = self.load_tokenizer()
        coded = load_coded(self.run.dir, segments, self.cfg.tokenizer.patch_length)
        gen = self._seed(4)
        model = WorldModelJEPA(self.cfg.jepa, tokenizer)
        batch_fn = code_batch_fn(coded, split, self.cfg.jepa.seq_len, self.cfg.train_jepa.batch_size)
        steps = JEPASteps(model, batch_fn, self.cfg.train_jepa, gen)
        bars = self.cfg.jepa.seq_len * self.cfg.tokenizer.patch_length * self.cfg.train_jepa.batch_size
        self._train(4, "jepa", steps, self.cfg.train_jepa.steps, bars)
        _atomic_bytes(self.run.dir / "jepa.pt", lambda f: torch.save(model.state_dict(), f))
        self._mark(4)

    def phase_evaluate(self) -> None:
        from cambium.worldmodel.report import write_report

        self._fresh_phase(5)
        self._seed(5)
        t0 = time.perf_counter()
        _, split = self.segments()
        model = self.load_jepa()
        coded = self.coded()
        probes = self.probes(model)
        _write_json(self.run.dir / "report" / "probe.json", probes)
        values: dict[str, float] = {"probe/n_train": probes["n_train"], "probe/n_holdout": probes["n_holdout"],
                                    "probe/majority_accuracy": probes["majority_accuracy"]}
        for r in probes["results"]:
            values[f"probe/{r['features']}/r2"] = r["r2"]
            values[f"probe/{r['features']}/accuracy"] = r["accuracy"]
        self.writer.flush()
        write_report(self, model, coded, split, probes)
        values["perf/evaluate/seconds"] = time.perf_counter() - t0
        self._log(self.steps[5][0], int(probes["n_holdout"]), values)
        self._mark(5)

    def execute(self, start: int, stop: int) -> list[int]:
        self.reporter.run_started(self.run.id)
        phases: dict[int, Callable[[], None]] = {1: self.phase_import, 2: self.phase_strate1,
                                                 3: self.phase_tokenize, 4: self.phase_strate2,
                                                 5: self.phase_evaluate}
        self._unmark_from(start)
        for phase in range(start, stop + 1):
            log.info("run %s: phase %d (%s)", self.run.id, phase, PHASES[phase])
            phases[phase]()
        self.writer.close()
        return self.done()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with p.open("wb") as fh:
            np.save(fh, array)

    _atomic_bytes(path, write)


def _bar_ms(s: CandleSeries) -> int:
    return int(s.open_time_ms[1] - s.open_time_ms[0])


def run_pipeline(cfg: WorldModelConfig, runs_root: Path, *, resume: str | None = None,
                 start_phase: int | None = None, stop_phase: int = 5, reporter: ProgressReporter | None = None,
                 show_progress: bool = True) -> PipelineResult:
    """Run phases start_phase … stop_phase in a new run, or continue run `resume` (see the module docstring)."""
    if not 1 <= stop_phase <= 5 or (start_phase is not None and not 1 <= start_phase <= stop_phase):
        raise ConfigError(f"phases must satisfy 1 <= start_phase <= stop_phase <= 5; got start_phase={start_phase}, "
                          f"stop_phase={stop_phase}")
    if cfg.pipeline.threads:
        torch.set_num_threads(cfg.pipeline.threads)
    reporter = reporter or ProgressReporter(None)
    if resume is None:
        if start_phase not in (None, 1):
            raise ConfigError(f"--start-phase {start_phase} needs --resume RUN, a run whose phases "
                              f"1-{start_phase - 1} are done")
        run = create_run(runs_root, system="worldmodel", name=cfg.size, config=cfg, seed=cfg.seed,
                         data_files=kline_files(cfg.data))
    else:
        run = open_run(runs_root, resume, config=cfg)
    with run:
        pipe = Pipeline(cfg, run, resumed=resume is not None, reporter=reporter, show_progress=show_progress,
                        restart_phase=start_phase)
        done = pipe.done()
        start = start_phase or next((p for p in range(1, 6) if p not in done), 6)
        missing = [p for p in range(1, start) if p not in done]
        if missing:
            raise RunError(f"run {run.id} has not done phases {missing}; resume it with --start-phase {missing[0]}")
        if start > stop_phase:
            log.info("run %s: phases 1-%d already done", run.id, stop_phase)
            pipe.writer.close()
            phases = done
        else:
            phases = pipe.execute(start, stop_phase)
        run.finish("finished", summary={**pipe.summary, "phases_done": phases})
    return PipelineResult(run.id, run.dir, phases, pipe.summary)
