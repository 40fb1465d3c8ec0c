"""The nested-learning quality study (issue 20's closing note): held-out perplexity and retrieval accuracy by distance
of SWA-only, full attention, MAG, MAC and MAL at equal parameters, and CMS k = 1 / 2 / 4, over several seeds.

Run: `python -m bench.nested_quality [--quick] [--seeds 0 1 2] [--steps 300] [--out bench/results/nested_quality.json]`.
Every model is the `tiny` shape (dim 64, 2 blocks, 4 heads, BPE 512 on tinyshakespeare, T = 64, 8 lanes; window
16 for the windowed models, 16-token segments and 4 persistent tokens for MAC), built for `--steps` outer steps with
the same data, schedule and seed per row; the SwiGLU width of each composition is the one that brings its parameter
count closest to MAG's (printed). CMS rows are MAG with more levels (periods [1, 8] and [1, 4, 16, 64]: the spec's
default [1, 8, 64, 512] would never fire its slow levels in a few hundred steps); they have more parameters (each
level is a memory layer), reported beside them, and `mag-wide` is the control: MAG k = 1 with its SwiGLU widened to
k = 2's parameter count. Each build is then evaluated with `evaluate_run(retrieval=True)`:
val perplexity over the whole val split and passkey / MQAR accuracy at distances 8, 32, 64, 128, 256 tokens.
Results: one record per run (composition, k, seed, parameters, val/ppl, accuracies) and a summary (mean ± sd) in the
JSON, a table on stdout. Builds run one thread each, one after another; run it under `nice -n 5`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from bench.common import mean_sd_n, resumable_study
from cambium.core.config import load_data
from cambium.data.mixture import ensure_mixture
from cambium.nested.build import build, evaluate_run
from cambium.nested.config import CONFIG_MODEL, NestedConfig
from cambium.nested.model import count_parameters

MEMORY = {"structure": "matrix", "bias": "l2", "retention": "l2", "algorithm": "gd", "execution": "chunkwise_exact",
          "chunk_size": 16}
SHAPE = {"vocab_size": 512, "dim": 64, "n_blocks": 2, "heads": 4}
MIXTURE = {"out_dir": "runs/data/nested-tiny", "tokenizer": {"kind": "bpe", "vocab_size": 512, "train_chars": 400000},
           "datasets": [{"name": "tinyshakespeare", "path": "data/samples/text/tinyshakespeare/input.txt",
                         "format": "text", "val_fraction": 0.05}]}
ROWS: dict[str, tuple[str, dict[str, Any], list[int]]] = {
    "swa": ("swa", {"window": 16}, [1]),
    "full": ("full", {}, [1]),
    "mag": ("mag", {"window": 16}, [1]),
    "mac": ("mac", {"segment_len": 16, "persistent_tokens": 4}, [1]),
    "mal": ("mal", {"window": 16}, [1]),
    "mag-k2": ("mag", {"window": 16}, [1, 8]),
    "mag-k4": ("mag", {"window": 16}, [1, 4, 16, 64]),
    "mag-wide": ("mag", {"window": 16}, [1]),
}
DISTANCES = (8, 32, 64, 128, 256)


def config(row: str, seed: int, steps: int, mlp_hidden: int) -> NestedConfig:
    composition, extra, periods = ROWS[row]
    model = {**SHAPE, "composition": composition, "mlp_hidden": mlp_hidden, **extra}
    data: dict[str, Any] = {
        "name": f"q-{row}-s{seed}", "model": model,
        "context": {"seq_len": 64, "batch_size": 8, "mixture": MIXTURE},
        "build": {"steps": steps, "lr": 3e-3, "warmup_steps": max(1, steps // 15), "seed": seed, "threads": 1,
                  "log_every": 25, "eval_every": steps, "checkpoint_every": steps},
    }
    if composition in ("mag", "mal", "mac"):
        model["memory"] = MEMORY
        data["cms"] = {"periods": periods}
    cfg: NestedConfig = load_data(data, CONFIG_MODEL)
    return cfg


def count(row: str, width: int) -> int:
    cfg = config(row, 0, 10, width)
    return count_parameters(cfg.model, cms=cfg.cms if cfg.model.has_memory else None)


def matched_width(row: str, target: int) -> int:
    """The SwiGLU width whose parameter count is closest to `target` (MAG k = 1 at width 128); `mag-wide` (k = 1)
    matches MAG k = 2 instead: the control that tells more levels from more parameters."""
    if row.startswith("mag-k"):
        return 128  # CMS rows keep MAG's shape: the extra levels are the point (their counts are reported)
    if row == "mag-wide":
        target = count("mag-k2", 128)
    return min(range(16, 1024), key=lambda h: abs(count(row, h) - target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rows, 1 seed, 20 steps (a smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/nested-quality"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/nested_quality.json"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.rows = [0], 20, ["swa", "mag"]
    torch.set_num_threads(1)
    base = config("mag", 0, 10, 128)
    target = count_parameters(base.model, cms=base.cms)
    ensure_mixture(base.context.mixture, rebuild=True)
    def measure(row: str, seed: int) -> dict[str, Any]:
        width = matched_width(row, target)
        cfg = config(row, seed, args.steps, width)
        result = build(cfg, args.runs_dir, show_progress=False)
        values = evaluate_run(args.runs_dir, result.run_id, retrieval=True, distances=DISTANCES)
        return {"run": result.run_id, "mlp_hidden": width,
                "periods": list(cfg.cms.periods) if cfg.model.has_memory else [], **values}

    def describe(r: dict[str, Any]) -> str:
        return (f"{r['parameters']:,.0f} params, val/ppl {r['val/ppl']:.2f}, passkey "
                + " ".join(f"{r[f'retrieval/passkey/d{d}']:.2f}" for d in DISTANCES)
                + ", mqar " + " ".join(f"{r[f'retrieval/mqar/d{d}']:.2f}" for d in DISTANCES))

    records = resumable_study(args.out, args.seeds, args.rows, args.steps, measure, summarise, describe)
    table(summarise(records))


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per row and metric: [mean, sd, n]."""
    return mean_sd_n(records, list(ROWS),
                     lambda runs: ["parameters", "val/ppl"] + [k for k in runs[0] if k.startswith("retrieval/")])


def table(summary: dict[str, dict[str, list[float]]]) -> None:
    for row, m in summary.items():
        print(f"{row:7s} n={m['val/ppl'][2]:.0f} params {m['parameters'][0]:,.0f}  val/ppl {m['val/ppl'][0]:.2f} ± "
              f"{m['val/ppl'][1]:.2f}  passkey " + " ".join(f"{m[f'retrieval/passkey/d{d}'][0]:.2f}" for d in DISTANCES)
              + "  mqar " + " ".join(f"{m[f'retrieval/mqar/d{d}'][0]:.2f}" for d in DISTANCES))


if __name__ == "__main__":
    main()
