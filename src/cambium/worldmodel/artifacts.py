"""What the pipeline's phases leave in a run directory, and how it is read back: segments and split, tokenizer and
JEPA weights, the pretokenized codes, probe numbers. The pipeline writes these files; the report and later phases
read them through `RunArtifacts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from cambium.core.errors import ConfigError
from cambium.core.files import atomic_write
from cambium.worldmodel.config import WorldModelConfig
from cambium.worldmodel.data import Split, load_segments
from cambium.worldmodel.evaluation import CodedSeries, probe_dataset, run_probes
from cambium.worldmodel.features import CandleBatch, clock_features
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.tokenizer import FSQTokenizer
from cambium.worldmodel.training import CandleSeries

__all__ = ["RunArtifacts", "code_batch_fn", "load_coded", "n_train_patches", "save_npy", "write_json"]


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.save(fh, array)

    atomic_write(path, write)


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
            info = json.loads((self.run_dir / "data" / "import.json").read_text(encoding="utf-8"))
            self._segments = load_segments(self.store_root, self.cfg.data, sorted(info["symbols"]))
            self._split = Split(**info["split"])
        return self._segments, self._split

    def load_tokenizer(self) -> FSQTokenizer:
        tokenizer = FSQTokenizer(self.cfg.tokenizer)
        tokenizer.load_state_dict(torch.load(self.run_dir / "tokenizer.pt", map_location="cpu", weights_only=True))
        return tokenizer.eval()

    def load_jepa(self) -> WorldModelJEPA:
        model = WorldModelJEPA(self.cfg.jepa, self.load_tokenizer())
        model.load_state_dict(torch.load(self.run_dir / "jepa.pt", map_location="cpu", weights_only=True))
        return model.eval()

    def coded(self) -> list[CodedSeries]:
        return load_coded(self.run_dir, self.segments()[0], self.cfg.tokenizer.patch_length)

    def probes(self, model: WorldModelJEPA | None = None) -> dict[str, Any]:
        """Phase 5's probe numbers computed from the run's files."""
        _, split = self.segments()
        data = probe_dataset(model or self.load_jepa(), self.coded(), split, self.cfg.evaluation)
        return run_probes(data, self.cfg.evaluation)
