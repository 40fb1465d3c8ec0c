"""ContextStream: the continuous token stream a nested model is built on (it replaces the DataLoader).

Legend: B lanes (parallel streams), T tokens per chunk, N tokens in the stream.

The stream is the concatenation of every dataset's shards of one split of a prepared mixture (in mixture order;
mixture weights do not apply, there is no sampling). Lane b starts at offset ⌊b·N/B⌋ and reads forward; every chunk
gives each lane its next T inputs plus one target token (`[B, T + 1]`). At the end of the stream a lane wraps to the
start: there are no epochs, only a position. All lanes advance together, so the cursor is a single count of tokens
consumed per lane.

Observe-then-advance: `observe()` returns the current chunk and is idempotent; `advance()` moves past it. A builder
observes, updates, advances, then checkpoints, so a crash between observing and advancing replays the same chunk.

Boundary events are typed: `document_end` where an input token is the tokenizer's end-of-text id (documents are
stored each followed by it), `wrap` where a lane's input returns to the first token of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cambium.core.checkpoint import cursor_int
from cambium.core.errors import CheckpointError, DataError
from cambium.data.mixture import read_mixture, verify_sources
from cambium.data.tokens import TokenShards

__all__ = ["BoundaryEvent", "Chunk", "ContextStream"]

STREAM_FORMAT = "cambium-context-stream/1"


@dataclass(frozen=True)
class BoundaryEvent:
    """A boundary inside a chunk: `kind` at input position `offset` (0 <= offset < T) of lane `lane`."""

    kind: Literal["document_end", "wrap"]
    lane: int
    offset: int


@dataclass(frozen=True)
class Chunk:
    """One step of the stream: `tokens [B, T + 1]` int64 (inputs `[:, :-1]`, targets `[:, 1:]`) and its events."""

    tokens: torch.Tensor
    step: int
    events: tuple[BoundaryEvent, ...] = field(default=())

    def count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.kind == kind)


class ContextStream:
    """B lanes over the token stream of `split` in the mixture at `root`; see the module docstring."""

    def __init__(self, root: Path, *, split: Literal["train", "val"] = "train", seq_len: int, lanes: int) -> None:
        mixture = read_mixture(root)
        verify_sources(root)
        if seq_len < 1 or lanes < 1:
            raise DataError(f"seq_len={seq_len} and lanes={lanes} must both be >= 1")
        self.root, self.split, self.seq_len, self.lanes = Path(root), split, seq_len, lanes
        self.eot_id = int(mixture["tokenizer"]["eot_id"])
        self.names = [d["name"] for d in mixture["datasets"]]
        self._shards = [TokenShards(self.root / name / split) for name in self.names]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens < lanes * (seq_len + 1):
            raise DataError(f"{split} split of {root} holds {self.n_tokens} tokens: too few for {lanes} lanes of "
                            f"seq_len={seq_len} (needs at least {lanes * (seq_len + 1)})")
        self.offsets = [b * self.n_tokens // lanes for b in range(lanes)]
        self.consumed = 0
        self.steps = 0

    def _read_flat(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated split; 0 <= start, start + length <= N."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            pos = start + filled
            i = int(np.searchsorted(self._starts, pos, side="right")) - 1
            take = min(length - filled, int(self._starts[i + 1]) - pos)
            out[filled : filled + take] = self._shards[i].read(pos - int(self._starts[i]), take)
            filled += take
        return out

    def _read_wrapped(self, position: int, length: int) -> np.ndarray:
        pieces, filled = [], 0
        while filled < length:
            pos = (position + filled) % self.n_tokens
            take = min(length - filled, self.n_tokens - pos)
            pieces.append(self._read_flat(pos, take))
            filled += take
        return np.concatenate(pieces)

    def observe(self) -> Chunk:
        """The current chunk (does not move the stream)."""
        rows, events = [], []
        for b, start in enumerate(self.offsets):
            position = start + self.consumed
            row = self._read_wrapped(position, self.seq_len + 1)
            rows.append(row)
            for offset in np.flatnonzero(row[:-1] == self.eot_id).tolist():
                events.append(BoundaryEvent("document_end", b, offset))
            first_wrap = (-position) % self.n_tokens
            for t in range(first_wrap, self.seq_len, self.n_tokens):
                if self.consumed + t > 0:
                    events.append(BoundaryEvent("wrap", b, t))
        events.sort(key=lambda e: (e.lane, e.offset, e.kind))
        return Chunk(torch.from_numpy(np.stack(rows)), self.steps, tuple(events))

    def advance(self) -> None:
        """Move every lane past the chunk `observe()` returned."""
        self.consumed += self.seq_len
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """The cursor (JSON-able): where the lanes are, and what stream they belong to."""
        return {"format": STREAM_FORMAT, "split": self.split, "seq_len": self.seq_len, "lanes": self.lanes,
                "n_tokens": self.n_tokens, "datasets": self.names, "consumed": self.consumed, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; a damaged cursor (it comes from cursor.json) is a CheckpointError naming the
        key."""
        if not isinstance(state, dict):
            raise CheckpointError(f"stream cursor: expected a JSON object, got {type(state).__name__}")
        mine = self.state_dict()
        keys = ("format", "split", "seq_len", "lanes", "n_tokens", "datasets")
        differ = {k: (state.get(k), mine[k]) for k in keys if state.get(k) != mine[k]}
        if differ:
            raise DataError(f"stream cursor belongs to another stream (saved, current): {differ}; resume with the "
                            "run's own config and mixture")
        steps = cursor_int(state, "steps", where="stream cursor")
        consumed = cursor_int(state, "consumed", where="stream cursor")
        if consumed != steps * self.seq_len:
            raise CheckpointError(f"stream cursor: consumed={consumed} must be steps * seq_len = {steps} * "
                                  f"{self.seq_len}")
        self.consumed, self.steps = consumed, steps
