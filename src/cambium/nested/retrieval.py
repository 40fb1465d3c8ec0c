"""Retrieval beyond the attention window (NES-8): passkey and multi-query associative recall (MQAR) probes.

Legend: S samples (the batch), L sequence length, d distance in tokens.

Both probes hide random tokens in real held-out text (the val split of the run's mixture, read as S lanes, so every
sample has its own filler) and ask the model to recall them `d` tokens later; the needles are drawn from the tokens
that occur in the filler, deterministically from `seed`. Accuracy is the fraction of target tokens the model
predicts (argmax) exactly, teacher-forced. A model sees the sequence the way it was built: in chunks of its
`seq_len`, carrying its context memory (CMS levels commit on their firing chunks) and, for a windowed attention,
its last window − 1 inputs, so that SWA always sees a full window and what lies further back reaches a token only
through the memory. Full attention sees its chunk only.

    passkey:  [lead filler] a1 … a6 [d filler tokens] a1 … a5        targets: a4 a5 a6 after a3 a4 a5
    mqar:     [lead filler] k1 v1 … k4 v4 [d filler tokens] kσ1 vσ1 … kσ4 vσ4   targets: vσi after kσi

A synthetic probe on a text-built model measures in-context copying (an induction-style skill a language model
learns from text), not instruction following: within the window every model can do it; beyond it, only a path that
carries the needle can.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from cambium.core.errors import ConfigError
from cambium.nested.cms import Conductor
from cambium.nested.model import ContextMemory, NestedLM
from cambium.nested.stream import ContextStream

__all__ = ["Probe", "default_distances", "make_probe", "probe_accuracy", "retrieval_accuracy"]

Kind = Literal["passkey", "mqar"]
NEEDLE, CUE, PAIRS = 6, 3, 4


@dataclass(frozen=True)
class Probe:
    """S sequences `tokens [S, L]` and where to score them: the logits at `positions [S, n]` should predict
    `targets [S, n]`."""

    kind: Kind
    distance: int
    tokens: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor


def default_distances(seq_len: int) -> tuple[int, ...]:
    """Inside any window, then past a short window, one chunk, two and four chunks back."""
    return (max(1, seq_len // 8), seq_len // 2, seq_len, 2 * seq_len, 4 * seq_len)


def _filler(root: Path, samples: int, length: int) -> tuple[torch.Tensor, int]:
    stream = ContextStream(root, split="val", seq_len=length, lanes=samples)
    return stream.observe().tokens[:, :length], stream.eot_id


def _draw(pool: torch.Tensor, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Distinct tokens per row, drawn from `pool`."""
    return torch.stack([pool[torch.randperm(len(pool), generator=gen)[:shape[1]]] for _ in range(shape[0])])


def make_probe(kind: Kind, root: Path, distance: int, *, samples: int = 32, lead: int = 16, seed: int = 0) -> Probe:
    """One probe batch at `distance` (deterministic from seed, kind and distance)."""
    if distance < 1 or samples < 1 or lead < 0:
        raise ConfigError(f"probe needs distance >= 1, samples >= 1 and lead >= 0, got {distance}, {samples}, {lead}")
    head = NEEDLE if kind == "passkey" else 2 * PAIRS
    tail = NEEDLE - 1 if kind == "passkey" else 2 * PAIRS
    length = lead + head + distance + tail
    filler, eot = _filler(root, samples, length)
    pool = torch.unique(filler)
    pool = pool[pool != eot]
    if len(pool) < 2 * PAIRS:
        raise ConfigError(f"the val split of {root} has too few distinct tokens for a {kind} probe")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + distance * 2 + (kind == "mqar"))
    tokens = filler.clone()
    rows = torch.arange(samples)[:, None]
    if kind == "passkey":
        needle = _draw(pool, (samples, NEEDLE), gen)
        tokens[:, lead:lead + NEEDLE] = needle
        start = lead + NEEDLE + distance
        tokens[:, start:] = needle[:, :NEEDLE - 1]
        positions = torch.arange(start + CUE - 1, start + NEEDLE - 1).expand(samples, -1)
        targets = needle[:, CUE:]
    else:
        keys = _draw(pool, (samples, 2 * PAIRS), gen)
        keys, values = keys[:, :PAIRS], keys[:, PAIRS:]
        tokens[:, lead:lead + 2 * PAIRS:2], tokens[:, lead + 1:lead + 2 * PAIRS:2] = keys, values
        order = torch.stack([torch.randperm(PAIRS, generator=gen) for _ in range(samples)])
        start = lead + 2 * PAIRS + distance
        tokens[:, start::2], tokens[:, start + 1::2] = keys[rows, order], values[rows, order]
        positions = torch.arange(start, length, 2).expand(samples, -1)
        targets = values[rows, order]
    return Probe(kind, distance, tokens, positions.clone(), targets)


@torch.no_grad()
def probe_accuracy(model: NestedLM, probe: Probe, *, seq_len: int, carry_attention: bool = True) -> float:
    """Fraction of the probe's targets the model predicts, reading the sequence in chunks of `seq_len`."""
    was_training = model.training
    model.eval()
    memory = ContextMemory(len(model.blocks), max(1, model.n_levels))
    conductor = Conductor(model.cms.periods, phase="eval")
    windowed = model.cfg.window is not None and carry_attention
    device = next(model.parameters()).device
    logits = []
    for s in range(0, probe.tokens.shape[1], seq_len):
        out, states, windows = model(probe.tokens[:, s:s + seq_len].to(device), memory.states,
                                     memory.windows if windowed else None)
        logits.append(out.argmax(-1).cpu())
        memory.update(states, windows, active=conductor.pulse().active)
        conductor.advance()
    model.train(was_training)
    predicted = torch.cat(logits, dim=1).gather(1, probe.positions)
    return float((predicted == probe.targets).float().mean())


def retrieval_accuracy(model: NestedLM, root: Path, *, seq_len: int, distances: Sequence[int] | None = None,
                       samples: int = 32, seed: int = 0, kinds: Sequence[Kind] = ("passkey", "mqar")
                       ) -> dict[str, float]:
    """`retrieval/<kind>/d<distance>` accuracy for every probe kind and distance (default: `default_distances`)."""
    out = {}
    for kind in kinds:
        for d in distances or default_distances(seq_len):
            probe = make_probe(kind, root, d, samples=samples, lead=seq_len // 4, seed=seed)
            out[f"retrieval/{kind}/d{d}"] = probe_accuracy(model, probe, seq_len=seq_len)
    return out
