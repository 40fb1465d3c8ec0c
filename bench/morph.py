"""morph: dormant-seed overhead on a host training step, and Tamiyo's decision latency.

Run: `python -m bench.morph [--quick] [--threads N]`. Writes bench/results/morph.json and prints one line per case.

Dormant overhead, measured end to end. A host CNN (widths 32/64/128, batch 64) wrapped with a DORMANT seed after each
of its 3 stages; blocks of training steps (forward, cross-entropy backward, AdamW step) are timed alternately with the
slots detached and attached (same model, same optimizer, same tensors), A B B A A B ... A block is `telemetry_every`
steps, so every attached block holds exactly one sampled step and the ratio is the average overhead, not the
overhead of the unsampled majority (a per-step median would miss the sampled steps). Before each block the Python
garbage collector runs, so a full collection never lands inside one side's block; collections the block itself
triggers still count. The estimate is the 10 % trimmed mean of the paired ratios attached/detached - 1, with a 95 %
bootstrap interval (2,000 resamples); pairing cancels the slow drift of the machine, and the interval says whether
< 1 % is resolved. Cases: telemetry sampled every 4th step (the default), every step (worst case), and never (the
slots' bare cost, and the method's noise floor: its true value is a few microseconds per step).

Dormant overhead, from its parts (the bound). The slot work per step is timed in isolation on the host's real
activation shapes: the unsampled forward (the identity), the sampled forward (telemetry + the gradient tap) and the
sampled backward (tap + gradient statistics). Their cost per step, (unsampled × (every - 1) + sampled fwd + bwd) /
every summed over the slots, over the detached host step time, is the overhead the end-to-end figure should agree
with; it is precise where the end-to-end interval is wide.

Decision latency. HeuristicPolicy.decide on a SystemStatePacket with 50 seeds (health signals with random scores),
median and 99th percentile over many calls; the reference value is the spec's 1 ms target.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.common import machine, make_record, parse_args, write_results
from cambium.morph.config import PolicyConfig, SeedsConfig
from cambium.morph.contracts import HealthSignal, Seed, SeedState, SystemStatePacket
from cambium.morph.controller import HeuristicPolicy
from cambium.morph.hosts import HostCNN
from cambium.morph.wrap import MorphedModel, wrap

WIDTHS = (32, 64, 128)
LOCATIONS = ("stages.0", "stages.1", "stages.2")
NEVER = 10**9


def _setup(batch: int, every: int) -> tuple[MorphedModel, Callable[[], None], torch.Tensor]:
    torch.manual_seed(0)
    wrapped = wrap(HostCNN(WIDTHS), SeedsConfig(telemetry_every=every), LOCATIONS)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)

    def step() -> None:
        loss = nn.functional.cross_entropy(wrapped(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return wrapped, step, x


def _trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    v = sorted(values)
    k = int(len(v) * cut)
    return statistics.fmean(v[k : len(v) - k])


def _trimmed_mean_ci(ratios: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """10 % trimmed mean of the paired ratios and its 95 % percentile-bootstrap interval (fixed RNG)."""
    rng = random.Random(0)
    boots = sorted(_trimmed_mean(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return _trimmed_mean(ratios), boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]


def _case(every: int) -> str:
    return f"dormant_overhead/every{every}" if every < NEVER else "dormant_overhead/never_sampled"


def dormant_overhead(pairs: int, batch: int, every: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    wrapped, step, _ = _setup(batch, every)
    block = every if every < NEVER else 4

    def timed(attached: bool) -> float:
        (wrapped.attach if attached else wrapped.detach)()
        gc.collect()
        t0 = time.perf_counter()
        for _ in range(block):
            step()
        return time.perf_counter() - t0

    for _ in range(3):
        timed(False)
        timed(True)
    ratios, ta, tb = [], [], []
    for i in range(pairs):
        sides = (False, True) if i % 2 == 0 else (True, False)  # alternate who goes first
        times = {side: timed(side) for side in sides}
        ta.append(times[False] / block)
        tb.append(times[True] / block)
        ratios.append(times[True] / times[False])
    wrapped.attach()
    est, lo, hi = _trimmed_mean_ci(ratios)
    print(f"{_case(every)}: overhead {100 * (est - 1):+.2f} % (95 % CI {100 * (lo - 1):+.2f} .. "
          f"{100 * (hi - 1):+.2f} %) over {pairs} pairs of {block}-step blocks; host step median "
          f"{1e3 * statistics.median(ta):.2f} ms")
    rec = make_record(
        _case(every), "step_time_median", statistics.median(tb) * 1e3, "ms", "same host, slots detached",
        statistics.median(ta) * 1e3, higher_is_better=False, machine_facts=facts,
    )
    rec.update(overhead_pct=100 * (est - 1), overhead_pct_ci95=[100 * (lo - 1), 100 * (hi - 1)],
               overhead_pct_median=100 * (statistics.median(ratios) - 1), pairs=pairs, block_steps=block,
               batch=batch, seeds=len(LOCATIONS), telemetry_every=every)
    return [rec]


def _best_per_call(fn: Callable[[], Any], calls: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def overhead_from_parts(calls: int, batch: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    """The slot work per step timed in isolation on the host's activation shapes, over the host step time."""
    wrapped, step, x = _setup(batch, 1)
    with torch.no_grad():  # the activation after each stage, as the slots see it
        acts, h = [], x
        for stage in wrapped.host.stages:
            h = stage(h)
            acts.append(h.detach())
    wrapped.detach()
    host_step = min(_best_per_call(step, 5) for _ in range(3))
    parts: dict[str, float] = {"unsampled_fwd": 0.0, "sampled_fwd": 0.0, "sampled_bwd": 0.0}
    for loc, act in zip(LOCATIONS, acts, strict=True):
        slot = wrapped.slot(loc)
        slot.train()
        slot.telemetry_every = NEVER
        parts["unsampled_fwd"] += _best_per_call(lambda s=slot, a=act: s(a), calls)  # type: ignore[misc]
        leaf = act.clone().requires_grad_(True)
        grad = torch.randn_like(act)
        slot.telemetry_every = 1
        parts["sampled_fwd"] += _best_per_call(lambda s=slot, a=leaf: s(a), calls // 4)  # type: ignore[misc]

        def fwd_bwd(s: Any = slot, a: torch.Tensor = leaf, g: torch.Tensor = grad) -> None:
            torch.autograd.grad(s(a), a, g)  # no accumulation into a.grad: the host pays no such copy

        parts["sampled_bwd"] += max(_best_per_call(fwd_bwd, calls // 4) - parts["sampled_fwd"] / len(LOCATIONS), 0.0)
        slot.telemetry_every = NEVER
    records = []
    for every in (4, 1):
        per_step = (parts["unsampled_fwd"] * (every - 1) + parts["sampled_fwd"] + parts["sampled_bwd"]) / every
        pct = 100 * per_step / host_step
        print(f"dormant_overhead_from_parts/every{every}: {pct:.3f} % = {1e6 * per_step:.1f} us of slot work per "
              f"{1e3 * host_step:.2f} ms host step (3 slots: unsampled fwd {1e6 * parts['unsampled_fwd']:.1f} us, "
              f"sampled fwd {1e6 * parts['sampled_fwd']:.1f} us, sampled bwd {1e6 * parts['sampled_bwd']:.1f} us)")
        rec = make_record(f"dormant_overhead_from_parts/every{every}", "slot_time_per_step", per_step * 1e6, "us",
                          "host step, slots detached", host_step * 1e6, higher_is_better=False, machine_facts=facts)
        rec.update(overhead_pct=pct, parts_us={k: v * 1e6 for k, v in parts.items()}, batch=batch,
                   seeds=len(LOCATIONS), telemetry_every=every)
        records.append(rec)
    return records


def decision_latency(calls: int, n_seeds: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    rng = random.Random(0)
    seeds = tuple(
        Seed(seed_id=f"s{i}", index=i, location=f"l{i}", state=SeedState.DORMANT, shape=("B", 16, 8, 8))
        for i in range(n_seeds)
    )
    health = tuple(
        HealthSignal(
            seed_id=f"s{i}", index=i, epoch=3, state=SeedState.DORMANT, activation_mean=0.0,
            activation_variance=1.0, gradient_norm=1.0, dead_unit_ratio=0.0, health_score=rng.random(),
            confidence=rng.random(), samples=20,
        )
        for i in range(n_seeds)
    )
    packet = SystemStatePacket(epoch=3, step=100, train_loss=1.0, health=health, seeds=seeds)
    policy = HeuristicPolicy(PolicyConfig())
    for _ in range(calls):
        policy.decide(packet)
    lat = sorted(policy.latencies_ms)
    med, p99 = statistics.median(lat), lat[min(int(0.99 * len(lat)), len(lat) - 1)]
    rec = make_record(
        f"tamiyo_heuristic/{n_seeds}seeds", "decision_latency_median", med, "ms", "spec target", 1.0,
        higher_is_better=False, machine_facts=facts,
    )
    rec["p99_ms"] = p99
    rec["calls"] = calls
    return [rec]


def main(argv: list[str] | None = None) -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")

    args = parse_args(__doc__ or "", argv, extra)
    torch.set_num_threads(args.threads)
    facts = machine()
    batch = 32 if args.quick else 64
    records = []
    # The default (every 4th step) gets the most pairs: it is the figure the < 1 % target is about.
    for every, pairs in ((4, 500), (1, 150), (NEVER, 150)):
        records += dormant_overhead(20 if args.quick else pairs, batch, every, facts)
    records += overhead_from_parts(50 if args.quick else 1000, batch, facts)
    records += decision_latency(200 if args.quick else 2000, 50, facts)
    write_results("morph", records, args.results_dir)


if __name__ == "__main__":
    main()
