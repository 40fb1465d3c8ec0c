"""`cambium worldmodel pipeline`: one run, nine phases, exact resume.

    1 import    kline files → candle store (validated, gap report) → chronological split with embargo
    2 strate1   train the FSQ tokenizer on the training window                  (checkpointed, resumable)
    3 tokenize  codes of every segment on the fixed patch grid → <run>/codes/  (+ codebook usage, hold-out recon loss)
    4 strate2   train the Mamba-2 JEPA on windows of pretokenized training codes (checkpointed, resumable)
    5 strate3   train OT-CFM latent futures + the return head on training anchors (checkpointed, resumable)
    6 futures   N return paths sampled at every hold-out origin → <run>/futures/
    7 evaluate  linear probes and the forecast evaluation against the baselines (WM-7) → <run>/report/
    8 agents    per-bar features (latents, Multiverse) of the agents' training window and the hold-out; PPO (and
                TD-MPC2) trained on the training window only → <run>/agents/
    9 backtest  agents and baselines on the hold-out after costs, bootstrap intervals, bias check → <run>/report/

Every phase logs into the run's metrics.duckdb at its own global steps, so that `truncate_after` on resume never
touches another phase's rows: phase 1 at step 1, phase 2 at 2 … S1 + 1, phase 3 at S1 + 2, phase 4 at S1 + 3 …
S1 + 2 + S2, phase 5 at S1 + S2 + 3 … S1 + S2 + S3 + 2, phase 6 one step later, phase 7 one more, phases 8 and 9
one more each. Names carry the phase (`import/`, `tokenizer/`, `pretokenize/`, `jepa/`, `flow/`, `futures/`,
`probe/`, `forecast/`, `agents/`, `backtest/`); wall-clock
figures go under `perf/`. A phase starts from fixed seeds (seed · 100 + phase), so running it
in a fresh process or after the earlier phases in one process gives the same numbers. `phases.json` lists the phases
done (with the step counts of the training phases and the sha256 of each file a phase leaves for later ones, checked
when they are read back: see `cambium.worldmodel.artifacts`); a resumed run continues with the first phase not done,
or whose step count the resume raised (from the phase's latest checkpoint when it trains), and redoes every phase
after it. Phases 8 and 9 read only the sections `env`, `agents`, `ppo`, `tdmpc`, `multiverse` and `backtest`, which a
resume may change: phases.json records their fingerprint, and a resume with other values redoes phases 8 and 9.

Phases 2, 4 and 5 are `cambium.core.loop` tasks (`TokenizerTask`, `JEPATask`, `FlowTask`) that the run's session
trains on `pipeline.device`, with a hold-out loss at every evaluation; phase 6 samples on that device too; phases 1, 3,
7, 8 and 9 run on the CPU. Under torchrun the
training phases run data parallel on every rank (the same global batches, each rank its rows) and rank 0 alone runs
the other phases and writes the run's files.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cambium.core.errors import ConfigError, DataError, RunError
from cambium.core.files import file_sha256
from cambium.core.loop import Session, open_session
from cambium.core.progress import ProgressReporter, get_logger
from cambium.core.runs import get_run
from cambium.worldmodel.agents import agents_fingerprint, backtest_phase, train_agents
from cambium.worldmodel.artifacts import (
    PHASE_OUTPUTS,
    PHASES_FILE,
    RunArtifacts,
    code_batch_fn,
    load_coded,
    output_hashes,
    save_npy,
    save_weights,
    write_json,
)
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
from cambium.worldmodel.evaluation import CodedSeries
from cambium.worldmodel.futures import Anchors, FlowTask, build_anchors, holdout_origins, sample_paths, train_anchors
from cambium.worldmodel.jepa import WorldModelJEPA, block_mask
from cambium.worldmodel.report import write_report
from cambium.worldmodel.tokenizer import FSQTokenizer
from cambium.worldmodel.training import CandleSeries, JEPATask, TokenizerTask, sample_windows

__all__ = ["LAST_PHASE", "PHASES", "Pipeline", "PipelineResult", "phase_steps", "phases_done", "run_pipeline"]

log = get_logger("cambium.worldmodel.pipeline")
PHASES = {1: "import", 2: "strate1", 3: "tokenize", 4: "strate2", 5: "strate3", 6: "futures", 7: "evaluate",
          8: "agents", 9: "backtest"}
LAST_PHASE = 9
TRAINING_PHASES = (2, 4, 5)


def phase_steps(cfg: WorldModelConfig) -> dict[int, tuple[int, int]]:
    """(first, last) global metric step of each phase."""
    s1, s2, s3 = cfg.train_tokenizer.steps, cfg.train_jepa.steps, cfg.train_flow.steps
    end3 = s1 + s2 + s3 + 2
    return {1: (1, 1), 2: (2, s1 + 1), 3: (s1 + 2, s1 + 2), 4: (s1 + 3, s1 + 2 + s2), 5: (s1 + s2 + 3, end3),
            6: (end3 + 1, end3 + 1), 7: (end3 + 2, end3 + 2), 8: (end3 + 3, end3 + 3), 9: (end3 + 4, end3 + 4)}


@dataclass
class PipelineResult:
    run_id: str
    run_dir: Path
    phases_done: list[int]
    summary: dict[str, float]


def _trained_steps(cfg: WorldModelConfig) -> dict[str, int]:
    return {"2": cfg.train_tokenizer.steps, "4": cfg.train_jepa.steps, "5": cfg.train_flow.steps}


def phases_done(run_dir: Path, cfg: WorldModelConfig) -> list[int]:
    """The phases of the run at `run_dir` that are done for `cfg`: those recorded in phases.json, up to the first
    training phase recorded with another step count than `cfg` asks for (it and everything after it are redone)."""
    path = run_dir / PHASES_FILE
    if not path.exists():
        return []
    record = json.loads(path.read_text(encoding="utf-8"))
    wanted, steps = _trained_steps(cfg), record.get("steps", {})
    out = []
    for p in sorted(record["done"]):
        if str(p) in wanted and steps.get(str(p)) != wanted[str(p)]:
            break
        if p >= 8 and record.get("agents_config") != agents_fingerprint(cfg):
            break  # the sections of phases 8-9 changed on resume (see AGENT_SECTIONS)
        out.append(p)
    return out


class Pipeline(RunArtifacts):
    """The phases of one run (see the module docstring)."""

    def __init__(self, cfg: WorldModelConfig, session: Session, *, restart_phase: int | None = None) -> None:
        super().__init__(session.run.dir, cfg)
        self.session, self.run = session, session.run
        self.restart_phase = restart_phase  # a phase rerun from scratch even if it has checkpoints
        self.steps = phase_steps(cfg)
        self.summary: dict[str, float] = {}

    # -- state of the run ------------------------------------------------------------------------------------------
    def done(self) -> list[int]:
        return phases_done(self.run.dir, self.cfg)

    def _hashes_before(self, phase: int) -> dict[str, str]:
        """The recorded hashes of the outputs of the done phases before `phase`."""
        path = self.run.dir / PHASES_FILE
        hashes = json.loads(path.read_text(encoding="utf-8")).get("hashes", {}) if path.exists() else {}
        keep = {name for p in self.done() if p < phase for name in PHASE_OUTPUTS.get(p, ())}
        return {name: digest for name, digest in hashes.items() if name in keep}

    def _mark(self, phase: int) -> None:
        self.session.metrics.flush()
        write_json(self.run.dir / PHASES_FILE, {"done": sorted({*[p for p in self.done() if p < phase], phase}),
                                                "steps": _trained_steps(self.cfg),
                                                "agents_config": agents_fingerprint(self.cfg),
                                                "hashes": {**self._hashes_before(phase),
                                                           **output_hashes(self.run.dir, phase)}})

    def _unmark_from(self, phase: int) -> None:
        write_json(self.run.dir / PHASES_FILE, {"done": [p for p in self.done() if p < phase],
                                                "steps": _trained_steps(self.cfg),
                                                "agents_config": agents_fingerprint(self.cfg),
                                                "hashes": self._hashes_before(phase)})

    def _seed(self, phase: int) -> torch.Generator:
        seed = self.cfg.pipeline.seed * 100 + phase
        torch.manual_seed(seed)
        return torch.Generator().manual_seed(seed)

    def _log(self, step: int, events: int, values: dict[str, float]) -> None:
        self.session.metrics.log(step, events, values)
        self.summary.update({k: v for k, v in values.items() if not k.startswith("perf/")})
        self.session.reporter.step_done(step)

    def _fresh_phase(self, phase: int) -> None:
        """Forget everything a previous attempt at `phase` (or a later phase) left: rows and checkpoints."""
        self.session.forget_from(self.steps[phase][0] - 1, collective=phase in TRAINING_PHASES)

    def _train(self, phase: int, prefix: str, task: TokenizerTask | JEPATask | FlowTask) -> None:
        if phase == self.restart_phase:
            self._fresh_phase(phase)
        result = self.session.fit(task, offset=self.steps[phase][0] - 1, phase=PHASES[phase], prefix=f"{prefix}/")
        self.summary.update({k: v for k, v in result.final.items() if not k.startswith("perf/")})

    # -- phases ----------------------------------------------------------------------------------------------------
    def phase_import(self) -> None:
        self._fresh_phase(1)
        t0 = time.perf_counter()
        report = import_candles(self.cfg.data, self.store_root, merge=self.cfg.data.store_dir is not None)
        segments = load_segments(self.store_root, self.cfg.data, sorted(report.symbols))
        split = chronological_split(segments, self.cfg.evaluation, self.cfg.data.interval)
        train = sum(int((s.open_time_ms < split.split_ms).sum()) for s in segments)
        hold = sum(int((s.open_time_ms >= split.holdout_ms).sum()) for s in segments)
        write_json(self.run.dir / "data" / "import.json", {**report.to_json(), "split": split.__dict__,
                                                            "segments": len(segments)})
        self._segments, self._split = segments, split
        self._log(self.steps[1][0], report.rows, {
            "import/symbols": len(report.symbols), "import/rows": report.rows, "import/segments": len(segments),
            "import/rejected_files": len(report.rejected), "import/gaps": report.gaps,
            "import/train_bars": train, "import/holdout_bars": hold, "perf/import/seconds": time.perf_counter() - t0,
        })
        self._mark(1)

    def phase_strate1(self) -> None:
        segments, split = self.segments()
        gen = self._seed(2)
        device = self.session.device
        tokenizer = FSQTokenizer(self.cfg.tokenizer).to(device.device)
        p = self.cfg.pipeline.tokenizer_window_patches
        bars = p * self.cfg.tokenizer.patch_length
        train = train_part(segments, split, bars)
        hold = holdout_part(segments, split, bars)
        holdout_gen = torch.Generator().manual_seed(self.cfg.pipeline.seed * 100 + 32)
        holdout = sample_windows(hold, bars, self.cfg.pipeline.holdout_windows, holdout_gen) if hold else None
        task = TokenizerTask(tokenizer, train, self.cfg.train_tokenizer, gen, p, device=device, holdout=holdout)
        self._train(2, "tokenizer", task)
        if self.session.is_main:
            save_weights(self.run.dir / "tokenizer.safetensors", tokenizer)
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
            save_npy(out_dir / file, codes.numpy().astype(np.int16))
            entries.append({"name": s.name, "file": file, "offset": offset, "patches": int(codes.shape[0]),
                            "first_open_time": int(s.open_time_ms[offset]), "sha256": file_sha256(out_dir / file)})
            cs = CodedSeries(s, codes, offset, patch)
            ends = s.open_time_ms[cs.end_bar(torch.arange(codes.shape[0]))]
            train_codes.append(codes[ends < split.split_ms])
            hold_codes.append(codes[ends - (patch - 1) * _bar_ms(s) >= split.holdout_ms])
        write_json(out_dir / "index.json", {"patch_length": patch, "codebook_size": tokenizer.codebook_size,
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
        gen = torch.Generator().manual_seed(self.cfg.pipeline.seed * 100 + 31)
        batch = sample_windows(hold, bars, 256, gen)
        return float(tokenizer(batch.ohlcv).loss)

    def phase_strate2(self) -> None:
        segments, split = self.segments()
        tokenizer = self.load_tokenizer()
        coded = load_coded(self.run.dir, segments, self.cfg.tokenizer.patch_length)
        gen = self._seed(4)
        device = self.session.device
        model = WorldModelJEPA(self.cfg.jepa, tokenizer).to(device.device)
        batch_fn = code_batch_fn(coded, split, self.cfg.jepa.seq_len, self.cfg.train_jepa.batch_size)
        task = JEPATask(model, batch_fn, self.cfg.train_jepa, gen, device=device,
                        holdout=self._jepa_holdout(coded, split))
        self._train(4, "jepa", task)
        if self.session.is_main:
            save_weights(self.run.dir / "jepa.safetensors", model)
            self._mark(4)

    def _jepa_holdout(self, coded: list[CodedSeries], split: Split) -> tuple[Tensor, Tensor, Tensor] | None:
        """A fixed batch of hold-out code windows with their masks (None if no segment has one)."""
        seq = self.cfg.jepa.seq_len
        try:
            holdout_fn = code_batch_fn(coded, split, seq, self.cfg.pipeline.holdout_windows, part="holdout")
        except ConfigError:
            return None
        gen = torch.Generator().manual_seed(self.cfg.pipeline.seed * 100 + 42)
        indices, clock = holdout_fn(gen)
        return indices, clock, block_mask(indices.shape[0], seq, self.cfg.jepa.masking, gen)

    def _anchors(self, from_ms: int | None = None) -> tuple[Anchors, list[CodedSeries], Split]:
        _, split = self.segments()
        coded = self.coded()
        anchors = build_anchors(self.load_jepa(), coded, self.cfg.flow, self.cfg.forecast.horizons,
                                self.cfg.evaluation.batch_windows, from_ms=from_ms)
        return anchors, coded, split

    def phase_strate3(self) -> None:
        anchors, coded, split = self._anchors()
        train = train_anchors(anchors, coded, split)
        future = ~torch.isnan(anchors.future).any(1) & ~torch.isnan(anchors.returns).any(1)
        hold = anchors.select(future & (anchors.origin_ms >= split.holdout_ms))
        if len(hold) > self.cfg.pipeline.holdout_windows:
            pick = torch.randperm(len(hold), generator=torch.Generator().manual_seed(self.cfg.pipeline.seed * 100 + 52))
            hold = hold.select(pick[: self.cfg.pipeline.holdout_windows].sort().values)
        gen = self._seed(5)
        device = self.session.device
        model = self.future_model()
        if len(train):
            model.fit_standardisation(train.latent)
        task = FlowTask(model, train, self.cfg.train_flow, gen, device=device, holdout=hold)
        model.to(device.device)
        self._train(5, "flow", task)
        if self.session.is_main:
            save_weights(self.run.dir / "flow.safetensors", model)
            self._mark(5)

    def phase_futures(self) -> None:
        self._fresh_phase(6)
        gen = self._seed(6)
        t0 = time.perf_counter()
        fc = self.cfg.forecast
        _, split = self.segments()
        anchors, coded, _ = self._anchors(from_ms=split.holdout_ms)
        hold = holdout_origins(anchors, coded, split, max(fc.horizons), fc.min_train_bars)
        if not len(hold):
            raise DataError(f"no hold-out origin with {max(fc.horizons)} realised bars in a segment with "
                            f"forecast.min_train_bars={fc.min_train_bars} training bars; use more data or lower them")
        model = self.load_flow().to(self.session.device.device)
        rng = np.random.default_rng(self.cfg.pipeline.seed * 100 + 6)
        t1 = time.perf_counter()
        paths = sample_paths(model, hold, fc, gen, rng, self.session.device.device)
        sample_s = time.perf_counter() - t1
        out = self.run.dir / "futures"
        out.mkdir(exist_ok=True)
        save_npy(out / "paths.npy", paths)
        write_json(out / "origins.json", {
            "segments": [cs.series.name for cs in coded], "segment": hold.segment.tolist(),
            "end_bar": hold.end_bar.tolist(), "origin_ms": hold.origin_ms.tolist(), "scale": hold.scale.tolist()})
        self._log(self.steps[6][0], int(paths.shape[0] * paths.shape[1]), {
            "futures/origins": paths.shape[0], "futures/paths": paths.shape[0] * paths.shape[1],
            "perf/futures/seconds": time.perf_counter() - t0,
            "perf/futures/paths_per_s": paths.shape[0] * paths.shape[1] / max(sample_s, 1e-9)})
        self._mark(6)

    def phase_evaluate(self) -> None:
        self._fresh_phase(7)
        self._seed(7)
        t0 = time.perf_counter()
        _, split = self.segments()
        model = self.load_jepa()
        coded = self.coded()
        probes = self.probes(model)
        write_json(self.run.dir / "report" / "probe.json", probes)
        values: dict[str, float] = {"probe/n_train": probes["n_train"], "probe/n_holdout": probes["n_holdout"],
                                    "probe/majority_accuracy": probes["majority_accuracy"]}
        for r in probes["results"]:
            values[f"probe/{r['features']}/r2"] = r["r2"]
            values[f"probe/{r['features']}/accuracy"] = r["accuracy"]
        forecast = self.forecast_scores()
        write_json(self.run.dir / "report" / "forecast.json", forecast)
        values["forecast/origins"] = forecast["n_origins"]
        for h, block in forecast["horizons"].items():
            for name, m in block["methods"].items():
                values[f"forecast/h{h}/{name}/crps"] = m["crps"]
                values[f"forecast/h{h}/{name}/coverage90"] = m["coverage90"]
            for name, dm in block.get("dm", {}).items():
                values[f"forecast/h{h}/dm_{name}/p_value"] = dm["p_value"]
        self.session.metrics.flush()
        write_report(self, model, coded, split, probes, forecast)
        values["perf/evaluate/seconds"] = time.perf_counter() - t0
        self._log(self.steps[7][0], int(probes["n_holdout"]), values)
        self._mark(7)

    def phase_agents(self) -> None:
        self._fresh_phase(8)
        self._seed(8)
        t0 = time.perf_counter()
        _, split = self.segments()
        values = train_agents(self, split, self.cfg.pipeline.seed * 100 + 8)
        values["perf/agents/seconds"] = time.perf_counter() - t0
        self._log(self.steps[8][0], int(values.get("agents/env_steps", 0)), values)
        self._mark(8)

    def phase_backtest(self) -> None:
        self._fresh_phase(9)
        self._seed(9)
        t0 = time.perf_counter()
        self.session.metrics.flush()
        values = backtest_phase(self, self.cfg.pipeline.seed * 100 + 9)
        values["perf/backtest/seconds"] = time.perf_counter() - t0
        self._log(self.steps[9][0], int(values.get("backtest/portfolio_bars", 0)), values)
        self._mark(9)

    def execute(self, start: int, stop: int) -> list[int]:
        phases: dict[int, Callable[[], None]] = {1: self.phase_import, 2: self.phase_strate1,
                                                 3: self.phase_tokenize, 4: self.phase_strate2,
                                                 5: self.phase_strate3, 6: self.phase_futures,
                                                 7: self.phase_evaluate, 8: self.phase_agents,
                                                 9: self.phase_backtest}
        if self.session.is_main:
            self._unmark_from(start)
        for phase in range(start, stop + 1):
            log.info("run %s: phase %d (%s)", self.run.id, phase, PHASES[phase])
            if phase in TRAINING_PHASES or self.session.is_main:
                phases[phase]()  # under torchrun the training phases run on every rank, the others on rank 0
            self.session.barrier()
        return self.done()


def _bar_ms(s: CandleSeries) -> int:
    return int(s.open_time_ms[1] - s.open_time_ms[0])


def run_pipeline(cfg: WorldModelConfig, runs_root: Path, *, resume: str | None = None,
                 start_phase: int | None = None, stop_phase: int = LAST_PHASE,
                 reporter: ProgressReporter | None = None,
                 show_progress: bool = True, measure_peak: bool = False) -> PipelineResult:
    """Run phases start_phase … stop_phase in a new run, or continue run `resume` (see the module docstring)."""
    if not 1 <= stop_phase <= LAST_PHASE or (start_phase is not None and not 1 <= start_phase <= stop_phase):
        raise ConfigError(f"phases must satisfy 1 <= start_phase <= stop_phase <= {LAST_PHASE}; got "
                          f"start_phase={start_phase}, "
                          f"stop_phase={stop_phase}")
    done: list[int] = []
    if resume is None:
        if start_phase not in (None, 1):
            raise ConfigError(f"--start-phase {start_phase} needs --resume RUN, a run whose phases "
                              f"1-{start_phase - 1} are done")
    else:
        done = phases_done(get_run(runs_root, resume).dir, cfg)
    start = start_phase or next((p for p in range(1, LAST_PHASE + 1) if p not in done), LAST_PHASE + 1)
    missing = [p for p in range(1, start) if p not in done]
    if missing:
        # Refused before the run is opened, so that its status stays as it was.
        raise RunError(f"run {resume} has not done phases {missing}; resume it with --start-phase {missing[0]}")
    with open_session(cfg, cfg.pipeline, runs_root, system="worldmodel", name=cfg.size, resume=resume,
                      data_files=kline_files(cfg.data), reporter=reporter, show_progress=show_progress,
                      measure_peak=measure_peak) as session:
        pipe = Pipeline(cfg, session, restart_phase=start_phase)
        if start > stop_phase:
            log.info("run %s: phases 1-%d already done", session.run.id, stop_phase)
            phases = done
        else:
            phases = pipe.execute(start, stop_phase)
        session.finish({**pipe.summary, "phases_done": phases})
    return PipelineResult(session.run.id, session.run.dir, phases, pipe.summary)
