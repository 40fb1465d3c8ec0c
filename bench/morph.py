"""morph: dormant-seed overhead on a host training step, and Tamiyo's decision latency.

Run: `python -m bench.morph [--quick] [--threads N]`. Writes bench/results/morph.json and prints one line per case.

Dormant overhead. A host CNN wrapped with a DORMANT seed after each of its 3 stages; a training step (forward,
cross-entropy backward, AdamW step) is timed alternately with the slots detached and attached (same model, same
optimizer, same tensors), A B B A A B ...,
and the overhead is the median of the paired ratios wrapped/plain - 1, with a 95 % confidence interval from the
order statistics of the paired ratios (sign-test interval, distribution-free). Pairing cancels the slow drift of a
loaded machine; the interval says whether < 1 % is resolved. Cases: telemetry sampled every 4th step (the default),
every step (worst case), and never (the slots' bare cost; also a check of the method's noise floor).

Decision latency. HeuristicPolicy.decide on a SystemStatePacket with 50 seeds (health signals with random scores),
median and 99th percentile over many calls; the reference value is the spec's 1 ms target.

Slot cost. The absolute time of one DORMANT slot forward (unsampled: the identity; sampled: telemetry taken).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from typing import Any

import torch
from torch import nn

from bench.common import machine, make_record, parse_args, write_results
from cambium.morph.config import PolicyConfig, SeedsConfig
from cambium.morph.contracts import HealthSignal, Seed, SeedState, SystemStatePacket
from cambium.morph.hosts import HostCNN
from cambium.morph.tamiyo import HeuristicPolicy
from cambium.morph.wrap import wrap


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _median_ci(ratios: list[float]) -> tuple[float, float, float]:
    """Median and a 95 % distribution-free interval (binomial order statistics) of paired ratios."""
    r = sorted(ratios)
    n = len(r)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(math.floor(n / 2 - half), 0)
    hi = min(math.ceil(n / 2 + half), n - 1)
    return statistics.median(r), r[lo], r[hi]


def dormant_overhead(pairs: int, batch: int, every: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    host = HostCNN((32, 64, 128))
    wrapped = wrap(host, SeedsConfig(telemetry_every=every), ("stages.0", "stages.1", "stages.2"))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    # One model, one optimizer: "plain" runs with the slots detached, so both sides share every tensor and
    # allocation pattern; the only difference is the seed slots in the path.
    step = _step_fn(wrapped, x, y)

    def plain() -> None:
        wrapped.detach()
        step()

    def seeded() -> None:
        wrapped.attach()
        step()

    for _ in range(3):
        plain()
        seeded()
    ratios, ta, tb = [], [], []
    for i in range(pairs):
        order = (plain, seeded) if i % 2 == 0 else (seeded, plain)  # alternate who goes first
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - t0
        ta.append(times[plain])
        tb.append(times[seeded])
        ratios.append(times[seeded] / times[plain])
    med, lo, hi = _median_ci(ratios)
    case = f"dormant_overhead/every{every}" if every < 10**9 else "dormant_overhead/never_sampled"
    print(f"{case}: overhead median {100 * (med - 1):+.2f} % (95 % CI {100 * (lo - 1):+.2f} .. "
          f"{100 * (hi - 1):+.2f} %) over {pairs} pairs; host step median {1e3 * statistics.median(ta):.2f} ms")
    rec = make_record(
        case, "step_time_median", statistics.median(tb) * 1e3, "ms", "same host, slots detached",
        statistics.median(ta) * 1e3, higher_is_better=False, machine_facts=facts,
    )
    rec["overhead_pct_median"] = 100 * (med - 1)
    rec["overhead_pct_ci95"] = [100 * (lo - 1), 100 * (hi - 1)]
    rec["pairs"] = pairs
    rec["batch"] = batch
    rec["seeds"] = 3
    rec["telemetry_every"] = every
    return [rec]


def slot_cost(calls: int, facts: dict[str, Any]) -> list[dict[str, Any]]:
    """Absolute cost of one dormant slot per forward (µs), sampled and unsampled, on a [64, 32, 16, 16] input."""
    out = []
    x = torch.randn(64, 32, 16, 16, requires_grad=True)
    for every in (10**9, 1):
        model = wrap(nn.Sequential(nn.Identity()), SeedsConfig(telemetry_every=every), ("0",))
        slot = model.slot("0")
        slot.train()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                slot.forward(x)
            best = min(best, (time.perf_counter() - t0) / calls)
        label = "unsampled" if every > 1 else "sampled"
        rec = make_record(f"slot_forward/{label}", "time_per_call", best * 1e6, "us", "none", None,
                          higher_is_better=False, machine_facts=facts)
        out.append(rec)
    return out


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
    pairs = 40 if args.quick else 300
    batch = 32 if args.quick else 64
    records = []
    # every = 10**9 never samples: the slots' bare cost in the path, and a check of the method's noise floor.
    for every in (4, 1, 10**9):
        records += dormant_overhead(pairs, batch, every, facts)
    records += slot_cost(200 if args.quick else 2000, facts)
    records += decision_latency(200 if args.quick else 2000, 50, facts)
    write_results("morph", records, args.results_dir)


if __name__ == "__main__":
    main()
