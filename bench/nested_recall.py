"""Recall beyond the attention window, learned: models built on a synthetic multi-query associative recall (MQAR)
context, then probed at needle distances inside and beyond the window and beyond the chunk.

Run: `python -m bench.nested_recall [--quick] [--seeds 0 1 2] [--steps 400] [--out bench/results/nested_recall.json]`.

Why a second study: on text, the small models of `bench.nested_quality` do not learn in-context copying in a few
hundred steps (every model, SWA-only or memory, scores ~0 on the passkey/MQAR probes at every distance, even inside
the window), so those probes cannot separate them. Here the context itself is recall: each sequence of T = 64
tokens starts with 2 key-value pairs (keys from tokens 16..63, values from 64..127, filler from 0..15), and later
the 2 keys come back, each followed by its value, at random places; the loss is on the 2 values only. The models are
the `tiny` shapes (dim 64, 2 blocks, 4 heads, vocabulary 128; window 8 for SWA/MAG/MAL, 8-token segments and 4
persistent tokens for MAC, full causal attention over the 64-token chunk), SwiGLU widths matched to MAG's
parameter count, AdamW 3e-3 (warm-up 20, cosine to 10 %), batch 16, one thread. CMS rows (`--rows mag-k2 mag-k4`)
are MAG with periods [1, 8] and [1, 4, 16, 64] (outer gradients buffered and applied on firing, as in a build).
The probe puts both queries `d` tokens after the pairs (d = 4 inside the window; 16, 32, 48 beyond the window but
inside the chunk; 96, 160 beyond the chunk, where the sequence is read in chunks of 64 with the context memory and
the attention window carried, as `nested eval` does) and reports the fraction of values predicted, 128 sequences per
distance (chance = 1/64).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import mean_sd_n, resumable_study
from cambium.core.config import load_data
from cambium.nested.cms import Conductor, OuterGradients
from cambium.nested.config import CONFIG_MODEL, NestedConfig
from cambium.nested.model import NestedLM, count_parameters
from cambium.nested.retrieval import Probe, probe_accuracy

MEMORY = {"structure": "matrix", "bias": "l2", "retention": "l2", "algorithm": "gd", "execution": "chunkwise_exact",
          "chunk_size": 16}
VOCAB, FILLER, KEYS, PAIRS, T, BATCH = 128, 16, 48, 2, 64, 16
ROWS: dict[str, tuple[str, dict[str, Any], list[int]]] = {
    "swa": ("swa", {"window": 8}, [1]),
    "mag": ("mag", {"window": 8}, [1]),
    "mac": ("mac", {"segment_len": 8, "persistent_tokens": 4}, [1]),
    "mal": ("mal", {"window": 8}, [1]),
    "full": ("full", {}, [1]),
    "mag-k2": ("mag", {"window": 8}, [1, 8]),
    "mag-k4": ("mag", {"window": 8}, [1, 4, 16, 64]),
}
DISTANCES = (4, 16, 32, 48, 96, 160)


def config(row: str, mlp_hidden: int) -> NestedConfig:
    composition, extra, periods = ROWS[row]
    model: dict[str, Any] = {"vocab_size": VOCAB, "dim": 64, "n_blocks": 2, "heads": 4, "composition": composition,
                             "mlp_hidden": mlp_hidden, **extra}
    data: dict[str, Any] = {"model": model}
    if composition in ("mag", "mal", "mac"):
        model["memory"] = MEMORY
        data["cms"] = {"periods": periods}
    cfg: NestedConfig = load_data(data, CONFIG_MODEL)
    return cfg


def n_params(cfg: NestedConfig) -> int:
    return count_parameters(cfg.model, cms=cfg.cms if cfg.model.has_memory else None)


def sequences(batch: int, length: int, gen: torch.Generator, distance: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens `[S, L]`, positions and targets `[S, 4]`: pairs at 0..7, queries at random places (or all `distance`
    tokens after the pairs)."""
    tokens = torch.randint(0, FILLER, (batch, length), generator=gen)
    keys = torch.stack([torch.randperm(KEYS, generator=gen)[:PAIRS] for _ in range(batch)]) + FILLER
    values = torch.randint(FILLER + KEYS, VOCAB, (batch, PAIRS), generator=gen)
    tokens[:, 0:2 * PAIRS:2], tokens[:, 1:2 * PAIRS:2] = keys, values
    order = torch.stack([torch.randperm(PAIRS, generator=gen) for _ in range(batch)])
    rows = torch.arange(batch)[:, None]
    if distance is None:  # 4 query slots of 2 tokens at distinct random places after the pairs
        slots = (length - 2 * PAIRS) // 2
        starts = torch.stack([torch.randperm(slots, generator=gen)[:PAIRS].sort().values for _ in range(batch)])
        starts = 2 * PAIRS + 2 * starts
    else:
        starts = (2 * PAIRS + distance + 2 * torch.arange(PAIRS)).expand(batch, -1)
    tokens[rows, starts], tokens[rows, starts + 1] = keys[rows, order], values[rows, order]
    return tokens, starts, values[rows, order]


def train(row: str, seed: int, steps: int, width: int) -> NestedLM:
    cfg = config(row, width)
    torch.manual_seed(seed)
    model = NestedLM(cfg.model, T, cfg.cms if cfg.model.has_memory else None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    periods = model.cms.periods
    conductor = Conductor(periods)
    outer = OuterGradients([model.level_parameters(i) for i in range(len(periods))], periods)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.1416))))
        for group in opt.param_groups:
            group["lr"] = float(lr)
        tokens, starts, targets = sequences(BATCH, T, gen)
        logits, _, _ = model(tokens)
        picked = logits[torch.arange(BATCH)[:, None], starts]  # [S, 4, V]: the logits at each query key
        loss = F.cross_entropy(picked.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        outer.gate(conductor.pulse())
        conductor.advance()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rows, 1 seed, 30 steps (a smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rows", nargs="+", default=list(ROWS)[:5], choices=list(ROWS),
                        help="default: the five compositions (the CMS rows cost as much again)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/nested_recall.json"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.rows = [0], 30, ["swa", "mag"]
    torch.set_num_threads(1)
    target = n_params(config("mag", 128))
    def measure(row: str, seed: int) -> dict[str, Any]:
        width = 128 if row.startswith("mag-k") else min(
            range(16, 512), key=lambda h: abs(n_params(config(row, h)) - target))
        model = train(row, seed, args.steps, width)
        gen = torch.Generator().manual_seed(99)
        accuracy = {}
        for d in DISTANCES:
            tokens, starts, targets = sequences(128, 2 * PAIRS + d + 2 * PAIRS, gen, distance=d)
            accuracy[f"d{d}"] = probe_accuracy(model, Probe("mqar", d, tokens, starts, targets), seq_len=T)
        return {"mlp_hidden": width, "parameters": sum(p.numel() for p in model.parameters()), **accuracy}

    def describe(r: dict[str, Any]) -> str:
        return f"{r['parameters']:,} params, recall by distance " + " ".join(f"{d}:{r[f'd{d}']:.2f}" for d in DISTANCES)

    records = resumable_study(args.out, args.seeds, args.rows, args.steps, measure, summarise, describe)
    for row, m in summarise(records).items():
        print(f"{row:7s} n={m['parameters'][2]:.0f} " + " ".join(f"{d}: {m[f'd{d}'][0]:.2f}±{m[f'd{d}'][1]:.2f}"
                                                         for d in DISTANCES))


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per row and metric: [mean, sd, n]."""
    return mean_sd_n(records, list(ROWS), lambda _: ["parameters", *(f"d{d}" for d in DISTANCES)])


if __name__ == "__main__":
    main()
