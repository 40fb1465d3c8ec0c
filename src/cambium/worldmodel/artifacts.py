"""What the pipeline's phases leave in a run directory, and how it is read back: segments and split, tokenizer and
JEPA weights, the pretokenized codes, probe numbers. The pipeline writes these files; the report and later phases
read them through `RunArtifacts`.

Every intermediate a later phase trusts carries its sha256: `codes/index.json` lists each `codes/*.npy` with its hash,
and `phases.json` records the hashes of the files each phase left (`PHASE_OUTPUTS`). Reading one back (a later phase,
a resume, the report) verifies it, and a file edited in between is refused in one line naming it and the phase that
makes it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from cambium.core.errors import ConfigError, DataError
from cambium.core.files import atomic_write, file_sha256
from cambium.worldmodel.config import WorldModelConfig
from cambium.worldmodel.data import Split, load_segments
from cambium.worldmodel.evaluation import CodedSeries, probe_dataset, run_probes
from cambium.worldmodel.features import CandleBatch, clock_features
from cambium.worldmodel.forecast import evaluate_forecasts
from cambium.worldmodel.futures import FutureModel, future_patches
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.tokenizer import FSQTokenizer
from cambium.worldmodel.training import CandleSeries

__all__ = ["PHASES_FILE", "PHASE_OUTPUTS", "RunArtifacts", "code_batch_fn", "load_coded", "n_train_patches",
           "output_hashes", "save_npy", "verified", "write_json"]

PHASES_FILE = "phases.json"
# The files each phase leaves for later phases (relative to the run directory), hashed into phases.json.
PHASE_OUTPUTS: dict[int, tuple[str, ...]] = {1: ("data/import.json",), 2: ("tokenizer.safetensors",),
                                             3: ("codes/index.json",), 4: ("jepa.safetensors",),
                                             5: ("flow.safetensors",), 6: ("futures/paths.npy", "futures/origins.json"),
                                             8: ("agents/holdout.npz", "agents/agents.json", "agents/ppo.safetensors",
                                                 "agents/tdmpc.safetensors")}
_MAKER = {name: phase for phase, names in PHASE_OUTPUTS.items() for name in names}


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


def output_hashes(run_dir: Path, phase: int) -> dict[str, str]:
    """sha256 of the files `phase` left for later phases (those that exist)."""
    return {name: file_sha256(run_dir / name) for name in PHASE_OUTPUTS.get(phase, ()) if (run_dir / name).is_file()}


def _refuse(path: Path, run_dir: Path, phase: int, why: str) -> DataError:
    return DataError(f"{path}: {why}; it was edited after phase {phase} wrote it — redo it with `cambium worldmodel "
                     f"pipeline --resume {run_dir.name} --start-phase {phase}`")


def verified(run_dir: Path, name: str) -> Path:
    """`run_dir / name`, checked against the sha256 that phases.json recorded for it (when it recorded one)."""
    path = run_dir / name
    phases = run_dir / PHASES_FILE
    if not phases.is_file():
        return path
    try:
        recorded = json.loads(phases.read_text(encoding="utf-8")).get("hashes", {}).get(name)
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{phases}: unreadable ({exc}); redo the run's phases with --start-phase") from None
    if recorded is None:
        return path
    if not path.is_file():
        raise _refuse(path, run_dir, _MAKER[name], "missing")
    actual = file_sha256(path)
    if actual != recorded:
        raise _refuse(path, run_dir, _MAKER[name], f"sha256 {actual[:12]} differs from {recorded[:12]} in "
                      f"{PHASES_FILE}")
    return path


def save_weights(path: Path, model: torch.nn.Module) -> None:
    """A trained model's weights as safetensors (no pickle: the file can travel), written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def load_weights(path: Path) -> dict[str, Tensor]:
    """Weights written by `save_weights`; anything else (a pickle, a damaged file) is one DataError."""
    try:
        return load_file(str(path), device="cpu")
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"{path}: not a safetensors weights file ({exc}); rerun the phase that writes it") from None


def load_coded(run_dir: Path, segments: list[CandleSeries], patch_length: int) -> list[CodedSeries]:
    """The pretokenized codes of phase 3, joined with their candle segments (every file checked against its hash)."""
    index_path = verified(run_dir, "codes/index.json")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        entries = list(index["segments"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _refuse(index_path, run_dir, 3, f"unreadable ({exc})") from None
    by_name = {s.name: s for s in segments}
    out = []
    for entry in entries:
        path = run_dir / "codes" / entry["file"]
        if path.parent != run_dir / "codes" or entry["name"] not in by_name:
            raise _refuse(index_path, run_dir, 3, f"entry {entry!r} names no code file of this run")
        if "sha256" in entry and (not path.is_file() or file_sha256(path) != entry["sha256"]):
            raise _refuse(path, run_dir, 3, "does not match its sha256 in codes/index.json")
        try:
            codes = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))
        except (OSError, ValueError) as exc:
            raise _refuse(path, run_dir, 3, f"unreadable ({exc})") from None
        out.append(CodedSeries(by_name[entry["name"]], codes, int(entry["offset"]), patch_length))
    return out


def n_train_patches(cs: CodedSeries, split: Split) -> int:
    """Patches of `cs` whose bars all lie in the training window."""
    ends = cs.series.open_time_ms[cs.end_bar(torch.arange(cs.codes.shape[0]))]
    return int((ends < split.split_ms).sum())


def _first_holdout_patch(cs: CodedSeries, split: Split) -> int:
    """The first patch of `cs` whose bars all lie in the hold-out window (patches after it do too)."""
    starts = cs.series.open_time_ms[cs.offset + torch.arange(cs.codes.shape[0]) * cs.patch_length]
    return int((starts < split.holdout_ms).sum())


def code_batch_fn(coded: list[CodedSeries], split: Split, seq_len: int, batch_size: int,
                  part: Literal["train", "holdout"] = "train") -> Callable[[torch.Generator], tuple[Tensor, Tensor]]:
    """Random windows of seq_len pretokenized codes of the training (or hold-out) window with their clock features."""
    ranges = []
    for cs in coded:
        lo, hi = (0, n_train_patches(cs, split)) if part == "train" else (_first_holdout_patch(cs, split),
                                                                           int(cs.codes.shape[0]))
        if hi - lo >= seq_len:
            ranges.append((cs, lo, hi))
    if not ranges:
        raise ConfigError(f"jepa.seq_len={seq_len} patches do not fit in any segment's {part} window; lower it")

    def batch(generator: torch.Generator) -> tuple[Tensor, Tensor]:
        which = torch.randint(len(ranges), (batch_size,), generator=generator).tolist()
        idx, ohlcv, times = [], [], []
        for i in which:
            cs, lo, hi = ranges[i]
            first = lo + int(torch.randint(hi - lo - seq_len + 1, (1,), generator=generator))
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

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.duckdb"

    def segments(self) -> tuple[list[CandleSeries], Split]:
        if self._segments is None or self._split is None:
            info = json.loads(verified(self.run_dir, "data/import.json").read_text(encoding="utf-8"))
            self._segments = load_segments(self.store_root, self.cfg.data, sorted(info["symbols"]))
            self._split = Split(**info["split"])
        return self._segments, self._split

    def load_tokenizer(self) -> FSQTokenizer:
        tokenizer = FSQTokenizer(self.cfg.tokenizer)
        tokenizer.load_state_dict(load_weights(verified(self.run_dir, "tokenizer.safetensors")))
        return tokenizer.eval()

    def load_jepa(self) -> WorldModelJEPA:
        model = WorldModelJEPA(self.cfg.jepa, self.load_tokenizer())
        model.load_state_dict(load_weights(verified(self.run_dir, "jepa.safetensors")))
        return model.eval()

    def future_model(self) -> FutureModel:
        """An untrained Strate III model of this config's shape."""
        p = self.cfg.tokenizer.patch_length
        return FutureModel(self.cfg.flow, self.cfg.jepa.encoder.d_model, future_patches(self.cfg.forecast.horizons, p),
                           p)

    def load_flow(self) -> FutureModel:
        model = self.future_model()
        model.load_state_dict(load_weights(verified(self.run_dir, "flow.safetensors")))
        return model.eval()

    def futures(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Phase 6's sampled paths [M, N, max(horizons)] and their origins (segment, end_bar, origin_ms, scale)."""
        paths = np.load(verified(self.run_dir, "futures/paths.npy"), allow_pickle=False)
        origins = json.loads(verified(self.run_dir, "futures/origins.json").read_text(encoding="utf-8"))
        return paths, origins

    def forecast_scores(self) -> dict[str, Any]:
        """The forecast evaluation of the run's sampled paths (phase 7; recomputable from the run's files)."""
        _, split = self.segments()
        coded = self.coded()
        paths, origins = self.futures()
        if origins["segments"] != [cs.series.name for cs in coded]:
            raise DataError(f"{self.run_dir / 'futures' / 'origins.json'}: its segments differ from the run's codes; "
                            f"redo phase 6 with --start-phase 6")
        fc = self.cfg.forecast
        return evaluate_forecasts(
            paths, np.asarray(origins["segment"]), np.asarray(origins["end_bar"]), np.asarray(origins["origin_ms"]),
            [cs.series for cs in coded], split.split_ms, horizons=fc.horizons,
            stride=self.cfg.tokenizer.patch_length, vol_window=self.cfg.flow.vol_window,
            bootstrap_window=fc.bootstrap_window, garch_refit_bars=fc.garch_refit_bars, garch_window=fc.garch_window,
            pit_bins=fc.pit_bins, rng=np.random.default_rng(self.cfg.pipeline.seed * 100 + 7))

    def coded(self) -> list[CodedSeries]:
        return load_coded(self.run_dir, self.segments()[0], self.cfg.tokenizer.patch_length)

    def probes(self, model: WorldModelJEPA | None = None) -> dict[str, Any]:
        """Phase 5's probe numbers computed from the run's files."""
        _, split = self.segments()
        data = probe_dataset(model or self.load_jepa(), self.coded(), split, self.cfg.evaluation)
        return run_probes(data, self.cfg.evaluation)
