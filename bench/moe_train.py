"""MoE training throughput at `moonlet-cpu`: tokens/s and MFU against this machine's fp32 matmul peak, measured in
the same run, plus where the step time goes.

Run: `python -m bench.moe_train [--quick] [--steps N] [--threads N] [--no-profile]`, or
`python -m bench.moe_train --processes [--quick] [--steps N]` for the multi-process case alone. Cases:

- `train_step` (tokens/s): `cambium.moe.train.MoETask.train_step` (data, forward, backward, clipping, Muon/AdamW,
  router-bias update, step metrics) on moonlet-cpu; reference: the dense twin of equal active parameters
  (`bench.moe_vs_dense.dense_twin`) through the same trainer, interleaved step by step (same load on both).
- `mfu` (fraction of peak): tokens/s × `cambium.moe.model.flops_per_token` / the best of several
  `cambium.core.doctor.measure_matmul_peak` calls taken between the steps; reference: the spec target 0.40.
- `fwd_bwd_mfu`: the same for forward + backward alone on a fixed batch (no data, optimiser, metrics).
- `dense_mfu`: the dense twin's MFU (what the same trainer reaches without routing), against 0.40.
- `mfu_cpu_time`: the train-step MFU with both the step and the matmul peak timed on the process CPU-time clock
  (`time.process_time`). Other processes' load stretches wall time but hardly CPU time, so with `--threads 1` this
  is the uncontended figure; with more threads, OpenMP spin-waits count as CPU time and pull it down.

- `processes_2` (tokens/s, `--processes`, written to `bench/results/moe_train_processes.json`): `cambium moe train`
  launched as 1 process and as 2 gloo processes under torchrun (experts sharded, the same global batch), one thread
  each; value: the 2-process run's tokens/s (rank 0's `perf/tokens_per_s`: global tokens per step over its step time,
  median after 2 warm-up steps), reference: the 1-process run; ratio / 2 is the scaling efficiency. Shape `small` of
  bench.moe_vs_dense (d=128, T=128, 16 sequences a step; `quick` with --quick).

Step times are best-of-N (the uncontended estimate on a shared machine); medians are in `detail`. On a 2-core box
shared with other jobs, `--threads 1` measures the code and the default (torch's thread count) measures the
contention: two threads stall on each other's preemption. `detail` of the
`mfu` record also holds the component breakdown (forward + backward of each part in isolation at the step's shapes,
times its count per step) and, unless `--no-profile`, the torch.profiler self-time of one step by operator class.
`--quick` shrinks the model (the `quick` shape of bench.moe_vs_dense) and uses one thread unless `--threads` says
otherwise, so it only checks that everything runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, make_record, parse_args, write_results
from bench.moe_vs_dense import CONFIG, SHAPES, dense_twin
from cambium.core.config import load
from cambium.core.doctor import measure_matmul_peak
from cambium.core.loop import DeviceContext
from cambium.core.metrics import read_metrics
from cambium.data.mixture import prepare_mixture
from cambium.moe.config import MoEConfig
from cambium.moe.model import MoETransformer, flops_per_token, lm_loss
from cambium.moe.train import MoETask
from cambium.nn.moe import MoE
from cambium.nn.moe_experts import combine, dispatch, expert_compute, plan_dispatch, resolve_backend

TARGET_MFU = 0.40

# Operator classes of the profile (self CPU time; first match wins).
OP_CLASSES: list[tuple[str, tuple[str, ...]]] = [
    ("attention kernel (SDPA)", ("scaled_dot_product", "flash_attention")),
    ("matmul", ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear", "aten::_grouped_mm",
                "aten::baddbmm")),
    ("gather/scatter/sort", ("index", "gather", "scatter", "argsort", "sort", "topk", "bincount", "repeat_interleave",
                             "aten::cat", "embedding", "aten::copy_", "aten::clone", "contiguous")),
    ("softmax/cross-entropy", ("softmax", "nll", "cross_entropy")),
]


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        fn().sum().backward()
    return run


def best_and_median(fn: Callable[[], Any], repeats: int, warmup: int = 1,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times), statistics.median(times)


def matmul_peak_cpu_time(n: int = 1024, runs: int = 5) -> float:
    """fp32 [n, n] @ [n, n] GFLOP per CPU-second of this process (best of `runs`): the peak on the CPU-time clock,
    which other processes' load inflates far less than wall time (with 1 thread it is the uncontended rate)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    best, _ = best_and_median(lambda: torch.mm(a, b, out=out), runs, clock=time.process_time)
    return 2.0 * n**3 / best / 1e9


def components(trainer: MoETask, repeats: int) -> dict[str, dict[str, float]]:
    """Forward + backward of each part of the model alone at the training shapes (inputs of unit variance), and the
    optimiser step and data batch of the trainer. Returns {part: {ms (per call, best), count (per step)}}."""
    cfg = trainer.cfg
    model: MoETransformer = trainer.model
    b, t, d = cfg.data.batch_size, cfg.data.seq_len, cfg.model.dim
    x = torch.randn(b, t, d, requires_grad=True)
    tokens = trainer.loader.next_batch()[:, :-1]
    parts: dict[str, tuple[Callable[[], None], int]] = {}
    block = model.blocks[0]
    parts["attention (MLA block)"] = (_fwd_bwd(lambda: block.attn(block.attn_norm(x))), cfg.model.n_layers)
    dense_blocks = [blk for blk in model.blocks if not isinstance(blk.ffn, MoE)]
    if dense_blocks:
        ffn = dense_blocks[0].ffn
        parts["dense SwiGLU"] = (_fwd_bwd(lambda: ffn(x)), len(dense_blocks))
    moe_layers = model.moe_layers()
    if moe_layers:
        layer = moe_layers[0]
        flat = x.detach().reshape(b * t, d).requires_grad_()
        parts["MoE layer (all)"] = (_fwd_bwd(lambda: layer(x)[0]), len(moe_layers))
        parts["  router"] = (_fwd_bwd(lambda: layer.router(flat).weights), len(moe_layers))
        if layer.shared is not None:
            shared = layer.shared
            parts["  shared expert"] = (_fwd_bwd(lambda: shared(x)), len(moe_layers))
        with torch.no_grad():
            routing = layer.router(flat)
        weights = routing.weights.detach().requires_grad_()
        backend = resolve_backend(layer.backend, flat.device, flat.dtype, (d, layer.expert_hidden))
        assert backend in ("grouped_mm", "padded_bmm", "segmented")

        def routed() -> torch.Tensor:
            plan = plan_dispatch(routing.indices, layer.n_experts)
            y = expert_compute(dispatch(flat, plan), plan.counts, layer.w13, layer.w2, backend, layer.lowp)
            return combine(y, weights, plan)
        parts[f"  routed experts ({backend} + dispatch/combine)"] = (_fwd_bwd(routed), len(moe_layers))

        def experts_only() -> torch.Tensor:
            return expert_compute(xs, counts, layer.w13, layer.w2, backend, layer.lowp)
        plan0 = plan_dispatch(routing.indices, layer.n_experts)
        xs, counts = dispatch(flat, plan0).detach().requires_grad_(), plan0.counts
        parts[f"    expert matmuls ({backend})"] = (_fwd_bwd(experts_only), len(moe_layers))
    h = torch.randn(b, t, d, requires_grad=True)
    parts["output head + loss"] = (lambda: lm_loss(model.norm(h) @ model.embed.weight.T if model.lm_head is None
                                                   else model.lm_head(model.norm(h)), tokens).backward(), 1)
    parts["embedding"] = (_fwd_bwd(lambda: model.embed(tokens)), 1)

    def optimizer_step() -> None:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        trainer.optimizer.clip_grad_norm(cfg.optim.grad_clip)
        trainer.optimizer.step()
    parts["optimizer (clip + Muon/AdamW)"] = (optimizer_step, 1)
    state = trainer.loader.state_dict()
    parts["data (next_batch)"] = (lambda: trainer.loader.next_batch(), 1)
    out = {}
    for name, (fn, count) in parts.items():
        best, _ = best_and_median(fn, repeats)
        out[name] = {"ms": best * 1e3, "count": count, "ms_per_step": best * 1e3 * count}
    trainer.loader.load_state_dict(state)
    model.zero_grad(set_to_none=True)
    return out


def profile_step(trainer: MoETask) -> dict[str, float]:
    """Self CPU time (ms) of one training step by operator class (OP_CLASSES, else 'other')."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        next_step(trainer)
    by_class: dict[str, float] = {}
    for ev in prof.key_averages():
        cls = next((c for c, keys in OP_CLASSES if any(k in ev.key for k in keys)), "other")
        by_class[cls] = by_class.get(cls, 0.0) + ev.self_cpu_time_total / 1e3
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print("  top operators by self CPU time (one step):")
    for ev in top:
        print(f"    {ev.key:<48} {ev.self_cpu_time_total / 1e3:9.1f} ms  x{ev.count}")
    return dict(sorted(by_class.items(), key=lambda kv: -kv[1]))


def make_trainer(cfg: MoEConfig) -> MoETask:
    return MoETask(cfg, DeviceContext(torch.device("cpu")))


def next_step(trainer: MoETask, _counts: dict[int, int] = {}) -> dict[str, float]:  # noqa: B006 - a step counter per task
    """One training step of `trainer`, numbered after the ones this bench already ran on it."""
    step = _counts.get(id(trainer), 0)
    _counts[id(trainer)] = step + 1
    return trainer.train_step(step)


def fwd_bwd_seconds(trainer: MoETask, repeats: int, clock: Callable[[], float] = time.perf_counter
                    ) -> tuple[float, float]:
    batch = trainer.loader.next_batch()
    model = trainer.model

    def run() -> None:
        model.zero_grad(set_to_none=True)  # as in a training step: the backward writes fresh gradients
        out = model(batch[:, :-1])
        (lm_loss(out.logits, batch[:, 1:]) + out.aux_loss).backward()
    result = best_and_median(run, repeats, clock=clock)
    model.zero_grad(set_to_none=True)
    return result


@torch.no_grad()
def padding_overhead(trainer: MoETask) -> list[float]:
    """Per MoE layer, rows the padded batched matmul computes over rows it needs: E·max(load) / Σ load (1 = none).
    The FLOPs model counts only the needed rows, so this factor is expert work that MFU does not credit."""
    out = trainer.model(trainer.loader.next_batch()[:, :-1])
    return [float(a.load.max() * a.load.numel() / a.load.sum()) for a in out.moe]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=CONFIG, help="MoE config (default moonlet-cpu)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per model (after 2 warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's / torch's)")
    parser.add_argument("--no-profile", action="store_true", help="skip the component breakdown and profiler")
    parser.add_argument("--processes", action="store_true", help="measure tokens/s at 1 and 2 processes instead")


def processes_tokens_per_s(config: Path, overrides: list[str], nproc: int, steps: int, work: Path) -> list[float]:
    """`cambium moe train` as `nproc` processes (torchrun, gloo, one thread each): rank 0's perf/tokens_per_s of
    every step after the first two."""
    runs = work / f"nproc{nproc}"
    head = [sys.executable, "-m", "cambium.moe"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "cambium.moe"]
    sets = [*overrides, f"train.max_steps={steps + 2}", "train.threads=1", f"train.eval_every={10**6}",
            f"train.checkpoint_every={10**6}", "train.eval_windows=1"]
    cmd = [*head, "train", "--config", str(config), "--runs-dir", str(runs), "--no-prep",
           *(a for x in sets for a in ("--set", x))]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    (run,) = [p for p in runs.iterdir() if (p / "metrics.duckdb").exists()]
    rows = sorted((r.step, r.value) for r in read_metrics(run / "metrics.duckdb", ["perf/tokens_per_s"]))
    return [v for step, v in rows if step > 2]


def processes(args: argparse.Namespace) -> None:
    overrides = list(SHAPES["quick" if args.quick else "small"])
    steps = args.steps or (4 if args.quick else 12)
    cfg = load(args.config, MoEConfig, overrides)
    if not (cfg.data.mixture.out_dir / "mixture.json").exists():
        prepare_mixture(cfg.data.mixture)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moe-processes-") as work:
        rates = {n: processes_tokens_per_s(args.config, overrides, n, steps, Path(work)) for n in (1, 2)}
    facts = machine("cpu")
    facts["load_avg_before"] = [round(x, 2) for x in load_before]
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    median = {n: statistics.median(v) for n, v in rates.items()}
    case = cfg.name + ("-quick" if args.quick else "-small")
    rec = make_record(f"{case}/processes_2", "tokens/s", median[2], "tokens/s", "1 process", median[1],
                      higher_is_better=True, machine_facts=facts)
    rec["detail"] = {"overrides": overrides, "steps": steps, "tokens_per_step": cfg.data.seq_len * cfg.data.batch_size,
                     "tokens_per_s": {str(n): v for n, v in rates.items()},
                     "scaling_efficiency": median[2] / median[1] / 2, "expert_parallel": True, "backend": "gloo"}
    print(f"1 process {median[1]:.0f} tokens/s, 2 processes {median[2]:.0f} tokens/s: scaling efficiency "
          f"{median[2] / median[1] / 2:.2f} (load {facts['load_avg_before']} -> {facts['load_avg_after']})")
    write_results("moe_train_processes", [rec], args.results_dir)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("MoE training throughput and MFU at moonlet-cpu", argv, _extra)
    if args.processes:
        processes(args)
        return
    overrides = list(SHAPES["quick"]) if args.quick else []
    threads = args.threads or (1 if args.quick else None)  # --quick: one thread stays sub-minute on a busy box
    if threads:
        overrides.append(f"train.threads={threads}")
    steps = args.steps or (3 if args.quick else 8)
    load_before = os.getloadavg()
    cfg = load(args.config, MoEConfig, overrides)
    dense_cfg, hidden = dense_twin(cfg)
    if not (cfg.data.mixture.out_dir / "mixture.json").exists():
        prepare_mixture(cfg.data.mixture)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    peaks = [measure_matmul_peak("cpu", runs=5)]
    moe, dense = make_trainer(cfg), make_trainer(dense_cfg)
    tokens_per_step = cfg.data.seq_len * cfg.data.batch_size
    times: dict[str, list[float]] = {"moe": [], "dense": []}
    cpu_times: dict[str, list[float]] = {"moe": [], "dense": []}
    cpu_peaks = [matmul_peak_cpu_time()]
    for i in range(steps + 2):  # interleaved: both models see the same load; first 2 steps are warm-up
        for name, trainer in (("moe", moe), ("dense", dense)):
            start, cpu_start = time.perf_counter(), time.process_time()
            next_step(trainer)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        peaks.append(measure_matmul_peak("cpu", runs=3))
        cpu_peaks.append(matmul_peak_cpu_time(runs=3))
    fb_best, fb_median = fwd_bwd_seconds(moe, max(2, steps // 2))
    fb_cpu, _ = fwd_bwd_seconds(moe, max(2, steps // 2), clock=time.process_time)
    padding = padding_overhead(moe)
    parts = prof = None
    if not args.no_profile:
        parts = components(moe, repeats=3)
        prof = profile_step(moe)
    moe.metrics.close()
    dense.metrics.close()
    peak = max(peaks)
    fpt, dense_fpt = flops_per_token(moe.model, cfg.data.seq_len), flops_per_token(dense.model, cfg.data.seq_len)
    best = {k: min(v) for k, v in times.items()}
    tps = {k: tokens_per_step / v for k, v in best.items()}
    mfu = tps["moe"] * fpt / (peak * 1e9)
    dense_mfu = tps["dense"] * dense_fpt / (peak * 1e9)
    fb_mfu = tokens_per_step / fb_best * fpt / (peak * 1e9)
    cpu_peak = max(cpu_peaks)
    best_cpu = {k: min(v) for k, v in cpu_times.items()}
    mfu_cpu = tokens_per_step * fpt / best_cpu["moe"] / (cpu_peak * 1e9)
    dense_mfu_cpu = tokens_per_step * dense_fpt / best_cpu["dense"] / (cpu_peak * 1e9)
    fb_mfu_cpu = tokens_per_step * fpt / fb_cpu / (cpu_peak * 1e9)
    facts = machine("cpu")
    facts["load_avg_before"] = [round(x, 2) for x in load_before]
    facts["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    facts["torch_threads"] = torch.get_num_threads()
    facts["matmul_peak_gflops"] = round(peak, 2)
    facts["matmul_peak_samples_gflops"] = [round(p, 2) for p in peaks]
    facts["matmul_peak_cpu_time_gflops"] = round(cpu_peak, 2)
    detail: dict[str, Any] = {
        "config": str(args.config.name), "overrides": overrides, "tokens_per_step": tokens_per_step,
        "flops_per_token": fpt, "dense_flops_per_token": dense_fpt, "dense_hidden": hidden,
        "active_params": moe.model.num_params(active=True, embeddings=False),
        "dense_active_params": dense.model.num_params(active=True, embeddings=False),
        "step_s_best": best, "step_s_median": {k: statistics.median(v) for k, v in times.items()},
        "step_cpu_s_best": best_cpu, "fwd_bwd_cpu_s_best": fb_cpu,
        "mfu_cpu_time": {"train_step": mfu_cpu, "dense_train_step": dense_mfu_cpu, "fwd_bwd": fb_mfu_cpu},
        "fwd_bwd_s_best": fb_best, "fwd_bwd_s_median": fb_median,
        "padded_bmm_rows_over_needed": padding, "components_ms": parts, "profile_ms": prof,
    }
    case = cfg.name + ("-quick" if args.quick else "")
    records = [
        make_record(f"{case}/train_step", "tokens/s", tps["moe"], "tokens/s", "dense twin (equal active params)",
                    tps["dense"], higher_is_better=True, machine_facts=facts),
        make_record(f"{case}/mfu", "MFU", mfu, "fraction of fp32 matmul peak", "spec target", TARGET_MFU,
                    higher_is_better=True, machine_facts=facts),
        make_record(f"{case}/fwd_bwd_mfu", "MFU (forward+backward only)", fb_mfu, "fraction of fp32 matmul peak",
                    "spec target", TARGET_MFU, higher_is_better=True, machine_facts=facts),
        make_record(f"{dense_cfg.name}/mfu", "MFU", dense_mfu, "fraction of fp32 matmul peak", "spec target",
                    TARGET_MFU, higher_is_better=True, machine_facts=facts),
    ]
    records.append(make_record(f"{case}/mfu_cpu_time", "MFU on the CPU-time clock", mfu_cpu,
                               "fraction of fp32 matmul peak", "spec target", TARGET_MFU, higher_is_better=True,
                               machine_facts=facts))
    records[1]["detail"] = detail
    print(f"peak {peak:.1f} GFLOP/s (samples {facts['matmul_peak_samples_gflops']}); {fpt / 1e6:.2f} MFLOP/token; "
          f"step best {best['moe'] * 1e3:.0f} ms (median {detail['step_s_median']['moe'] * 1e3:.0f}); "
          f"load {facts['load_avg_before']} -> {facts['load_avg_after']}")
    print(f"  CPU-time clock: peak {cpu_peak:.1f} GFLOP/cpu-s; MFU train step {mfu_cpu:.3f}, dense twin "
          f"{dense_mfu_cpu:.3f}, forward+backward {fb_mfu_cpu:.3f}")
    print(f"  padded_bmm computes {', '.join(f'{p:.2f}' for p in padding)}x the needed expert rows (per MoE layer)")
    if parts is not None:
        print(f"  components (forward+backward alone, best of 3; step {best['moe'] * 1e3:.0f} ms):")
        for name, row in parts.items():
            print(f"    {name:<48} {row['ms']:8.1f} ms x{row['count']} = {row['ms_per_step']:8.1f} ms")
    if prof is not None:
        print("  profile of one step, self CPU ms by class: "
              + ", ".join(f"{k} {v:.0f}" for k, v in prof.items()))
    write_results("moe_train", records, args.results_dir)


if __name__ == "__main__":
    main()
