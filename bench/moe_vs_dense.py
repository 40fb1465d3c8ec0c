"""MoE vs dense at equal active parameters and equal tokens on the committed text (spec target: MoE val loss lower).

Run: `python -m bench.moe_vs_dense [--quick] [--shape small|moonlet-cpu|quick] [--steps N] [--threads N]
[--optim muon_experts adamw] [--seeds 0 1 2]`.

Both models come from `configs/moe/moonlet-cpu.toml` (its mixture: tinyshakespeare + wikitext-2, BPE 4096) with the
same shape overrides; the dense twin makes every layer a dense SwiGLU whose width is solved so that its active
parameter count (input embedding and output head excluded) equals the MoE model's (`dense_twin`). Both are trained by
`cambium.moe.train.MoETask` with the same seed, data order, WSD schedule (5 % warmup, 20 % 1-sqrt decay, by tokens)
and token budget, and evaluated on the same validation windows. Optimiser settings (`OPTIM_OVERRIDES`): "muon", as
the configs ship (Muon for 2-D dense matrices, AdamW for routed experts, so the dense twin's whole feed-forward gets
Muon and the MoE's routed experts do not); "muon_experts" (Muon for the routed experts too, each expert's matrix
orthogonalised on its own); "adamw" (AdamW everywhere). Every setting runs once per seed (`train.seed`: the
initialisation and the data order). Validation uses the first 24 held-out windows of T+1 tokens of each dataset (8
with --quick), the same for both models. Cases, per setting:

- `val_loss` (nats/token): value = MoE final validation loss averaged over the seeds, reference = dense; ratio =
  dense / MoE (> 1: MoE wins). The record's `detail` holds each seed's figures, the mean and the sample sd.
- `val_bpb` (bits/byte): the same in bits per UTF-8 byte.

The validation curves (mean over seeds, band ± sd) go to `docs/img/moe_vs_dense.png` (`--plot`); the JSON records
carry every curve, the parameter counts, the wall time of each run and the load average. Default: shape `small`
(d=128, T=128, 16×128 tokens a step), 100 steps (204,800 tokens), seeds 0 1 2, settings muon_experts and adamw:
twelve runs (15 minutes of training at load 3–7 on the shared 2-core box; docs/moe.md also quotes `--shape quick
--steps 200 --eval-every 50`). Pass `--threads 1` on a shared machine: two threads on two busy cores stall on each
other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, make_record, parse_args, write_results
from cambium.core.config import load, load_data
from cambium.core.loop import DeviceContext
from cambium.data.mixture import prepare_mixture
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer
from cambium.moe.train import MoETask

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "moe" / "moonlet-cpu.toml"
PLOT = ROOT / "docs" / "img" / "moe_vs_dense.png"

# The trainer gives Muon to 2-D dense matrices and AdamW to routed experts, so the dense twin's whole feed-forward
# gets Muon while the MoE's routed experts do not: "adamw" (optim.muon=false for both) removes that confound.
OPTIM_OVERRIDES: dict[str, list[str]] = {
    "muon": ["optim.muon=true", "optim.muon_experts=false"],
    "muon_experts": ["optim.muon=true", "optim.muon_experts=true"],
    "adamw": ["optim.muon=false"],
}
OPTIM_TITLES = {"muon": "as configured: Muon for dense matrices, AdamW for routed experts",
                "muon_experts": "Muon for dense matrices and routed experts (optim.muon_experts=true)",
                "adamw": "AdamW for every parameter (optim.muon=false)"}

# Shape overrides applied to both models (moonlet-cpu's layout: 4 layers, 1 dense + 3 MoE, 16 experts top-4 + 1
# shared, MLA), shrunk in width and context.
SHAPES: dict[str, list[str]] = {
    "moonlet-cpu": [],
    "small": ["model.dim=128", "model.dense_hidden=384", "model.moe.expert_hidden=64", "model.max_seq_len=128",
              "model.attention.kv_lora_rank=32", "data.seq_len=128", "data.batch_size=16"],
    "quick": ["model.dim=64", "model.dense_hidden=192", "model.moe.expert_hidden=32", "model.max_seq_len=64",
              "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=16",
              "model.attention.qk_rope_head_dim=8", "model.attention.v_head_dim=16", "data.seq_len=64",
              "data.batch_size=8"],
}


def active_params(cfg: MoEConfig) -> int:
    """Parameters a token passes through (routed experts count top_k of n_routed), embeddings/head excluded."""
    return MoETransformer(cfg.model).num_params(active=True, embeddings=False)


def dense_twin(cfg: MoEConfig) -> tuple[MoEConfig, int]:
    """The all-dense model of `cfg` (same attention, depth, width, data, optimiser, schedule; no moe table) whose
    dense SwiGLU width h makes its active parameter count closest to `cfg`'s. Returns (config, h).
    Dense params are P0 + L·3·D·h, so h follows from the count at h=1."""

    def twin(hidden: int) -> MoEConfig:
        data = cfg.model_dump(mode="json")
        data["name"] = f"{cfg.name}-dense"
        data["model"].update(n_dense_layers=cfg.model.n_layers, dense_hidden=hidden)
        del data["model"]["moe"]
        return load_data(data, MoEConfig)

    target = active_params(cfg)
    dims = cfg.model.n_layers * 3 * cfg.model.dim
    hidden = max(1, round((target - active_params(twin(1))) / dims) + 1)
    return twin(hidden), hidden


def schedule_overrides(total_tokens: int, lr: float) -> list[str]:
    warmup, decay = int(total_tokens * 0.05), int(total_tokens * 0.2)
    return ["schedule.kind=wsd", "schedule.unit=tokens", f"schedule.warmup={warmup}",
            f"schedule.stable={total_tokens - warmup - decay}", f"schedule.decay={decay}",
            f"schedule.lr_max={lr}", f"optim.dense_lr={lr}"]


def train_curve(cfg: MoEConfig, eval_every: int) -> dict[str, Any]:
    """Train `cfg` for its schedule; validation every `eval_every` steps and at the end. Returns curves and figures."""
    trainer = MoETask(cfg, DeviceContext(torch.device("cpu")))
    total = trainer.steps_to_run
    curve: list[dict[str, float]] = []
    train_loss: list[float] = []
    start = time.perf_counter()
    for step in range(total):
        values = trainer.train_step(step)
        train_loss.append(values["lm_loss"])
        done = step + 1
        if done % eval_every == 0 or done == total:
            ev = trainer.evaluate()
            curve.append({"step": done, "tokens": done * trainer.events_per_step, "val_loss": ev["val/loss"],
                          "val_bpb": ev["val/bpb"]})
            print(f"  {cfg.name} step {done}/{total} train {values['lm_loss']:.3f} "
                  f"val {ev['val/loss']:.3f} ({ev['val/bpb']:.3f} bpb) {time.perf_counter() - start:.0f} s",
                  flush=True)
    seconds = time.perf_counter() - start
    model = trainer.model
    return {"name": cfg.name, "curve": curve, "train_loss": train_loss, "seconds": seconds,
            "tokens": total * trainer.events_per_step, "steps": total,
            "active_params": model.num_params(active=True, embeddings=False),
            "total_params": model.num_params(embeddings=False)}


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(results: dict[str, dict[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """One panel per optimiser setting: validation loss against tokens for the MoE model and its dense twin, the
    mean over seeds with a ± sd band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.2), dpi=110, squeeze=False,
                             sharey=True)
    for ax, (optim, pair) in zip(axes[0], results.items(), strict=True):
        for label, runs in pair.items():
            tokens = [p["tokens"] / 1e6 for p in runs[0]["curve"]]
            stats = [mean_sd([r["curve"][i]["val_loss"] for r in runs]) for i in range(len(tokens))]
            mean = [m for m, _ in stats]
            line, = ax.plot(tokens, mean, marker="o", ms=3,
                            label=f"{label}: {runs[0]['active_params'] / 1e6:.2f}M active / "
                                  f"{runs[0]['total_params'] / 1e6:.2f}M ({len(runs)} seeds)")
            ax.fill_between(tokens, [m - sd for m, sd in stats], [m + sd for m, sd in stats], alpha=0.2,
                            color=line.get_color())
        ax.set_title(OPTIM_TITLES[optim], fontsize=9)
        ax.set_xlabel("training tokens (millions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation loss (nats/token)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="shape overrides (default: small)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (same for both models)")
    parser.add_argument("--eval-every", type=int, default=None, help="validation every this many steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a busy box)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every group")
    parser.add_argument("--optim", nargs="+", choices=sorted(OPTIM_TITLES), default=None,
                        help="optimiser settings to compare under (default: muon_experts adamw; --quick: muon)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train.seed of each repetition (default: 0 1 2; --quick: 0)")
    parser.add_argument("--plot", type=Path, default=None, help=f"curve PNG (default {PLOT}; not written by --quick)")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("MoE vs dense at equal active parameters and tokens", argv, _extra)
    shape = args.shape or ("quick" if args.quick else "small")
    steps = args.steps or (10 if args.quick else 100)
    eval_every = args.eval_every or (5 if args.quick else 25)
    windows = 8 if args.quick else 24
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    load_before = os.getloadavg()
    base = load(CONFIG, MoEConfig, SHAPES[shape])
    tokens = steps * base.data.seq_len * base.data.batch_size
    common = [*SHAPES[shape], *schedule_overrides(tokens, args.lr), f"train.eval_windows={windows}",
              f"optim.expert_lr={args.lr}", f"optim.embedding_lr={args.lr}"]
    threads = args.threads or (1 if args.quick else None)  # --quick: one thread stays sub-minute on a busy box
    if threads:
        common.append(f"train.threads={threads}")
        torch.set_num_threads(threads)  # MoETask is driven directly here, not through the loop that applies it
    optims = args.optim or (["muon"] if args.quick else ["muon_experts", "adamw"])
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    hidden = 0
    for optim in optims:
        results[optim] = {"moe": [], "dense": []}
        for seed in seeds:
            overrides = [*common, *OPTIM_OVERRIDES[optim], f"train.seed={seed}"]
            moe_cfg = load(CONFIG, MoEConfig, overrides)
            dense_cfg, hidden = dense_twin(moe_cfg)
            if not (moe_cfg.data.mixture.out_dir / "mixture.json").exists():
                prepare_mixture(moe_cfg.data.mixture)
            print(f"shape {shape}, optimiser {optim}, seed {seed}: {steps} steps x "
                  f"{base.data.seq_len * base.data.batch_size} tokens; dense twin hidden {hidden}", flush=True)
            results[optim]["moe"].append(train_curve(moe_cfg, eval_every) | {"seed": seed})
            results[optim]["dense"].append(train_curve(dense_cfg, eval_every) | {"seed": seed})
    facts = machine("cpu")
    facts["load_avg_before"] = [round(x, 2) for x in load_before]
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    records = []
    for optim, pair in results.items():
        detail: dict[str, Any] = {
            "shape": shape, "optim": optim, "threads": torch.get_num_threads(), "shape_overrides": SHAPES[shape],
            "steps": steps, "tokens": pair["moe"][0]["tokens"], "dense_hidden": hidden, "lr": args.lr,
            "seeds": seeds, "moe": [{k: v for k, v in r.items() if k != "name"} for r in pair["moe"]],
            "dense": [{k: v for k, v in r.items() if k != "name"} for r in pair["dense"]]}
        for metric, unit in (("val_loss", "nats/token"), ("val_bpb", "bits/byte")):
            moe_m, moe_sd = mean_sd([r["curve"][-1][metric] for r in pair["moe"]])
            dense_m, dense_sd = mean_sd([r["curve"][-1][metric] for r in pair["dense"]])
            rec = make_record(f"moe_vs_dense_{shape}_{optim}", metric, moe_m, unit, "dense equal-active", dense_m,
                              higher_is_better=False, machine_facts=facts)
            rec["detail"] = detail | {"moe_sd": moe_sd, "dense_sd": dense_sd}
            records.append(rec)
            print(f"{optim} {metric}: MoE {moe_m:.4f} ± {moe_sd:.4f}, dense {dense_m:.4f} ± {dense_sd:.4f} "
                  f"over seeds {seeds}", flush=True)
    write_results("moe_vs_dense", records, args.results_dir)
    if not args.quick or args.plot is not None:
        path = args.plot or PLOT
        first = next(iter(results.values()))["moe"][0]
        plot(results, path, f"MoE vs dense twin, equal active params ({first['active_params'] / 1e6:.2f}M), "
                            f"moonlet-cpu layout at shape '{shape}', {first['tokens'] / 1e6:.2f}M tokens, "
                            f"mean ± sd over {len(seeds)} seeds")
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
