"""morph: Tamiyo's GNN decision latency (MOR-6) against the heuristic's, on the same packets in the same run.

Run: `python -m bench.morph_gnn [--quick] [--threads N] [--policy FILE]`. Writes bench/results/morph_gnn.json.

A SystemStatePacket of 50 seeds (a nested module tree: `stages.<i//2>.<i%2>`, conv and token shapes, random
telemetry, some seeds busy or embargoed) is decided by `GnnPolicy.decide` (graph built from the packet, PyG forward,
masks, budget: the whole call) and by `HeuristicPolicy.decide`, calls interleaved one by one so both see the same
machine. Median and 99th percentile of each policy's own `latencies_ms`; the GNN's median is also split into graph
building and the network's forward. The GNN is the architecture Simic trains by default (hidden 64, 3 rounds) with
random weights unless `--policy` names a trained file (the latency does not depend on the weights). Reference: the
spec's 10 ms target for the GNN (and 1 ms for the heuristic); `gnn_over_heuristic` is the ratio of the medians.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, make_record, parse_args, write_results
from cambium.morph.config import PolicyConfig
from cambium.morph.contracts import HealthSignal, Seed, SeedState, SystemStatePacket
from cambium.morph.controller import HeuristicPolicy
from cambium.morph.gnn import N_FEATURES, GnnPolicy, TamiyoGNN, build_graph, load_policy, vocabulary


def packet(n_seeds: int, seed: int) -> SystemStatePacket:
    rng = random.Random(seed)
    seeds, health = [], []
    for i in range(n_seeds):
        loc = f"stages.{i // 2}.{i % 2}"
        state = rng.choice([SeedState.DORMANT] * 8 + [SeedState.TRAINING, SeedState.FOSSILIZED])
        shape = ("B", 16 * (1 + i % 4), 8, 8) if i % 5 else ("B", 64, 32)
        seeds.append(Seed(seed_id=loc, index=i, location=loc, state=state, shape=shape,
                          embargo_until=rng.choice([0, 0, 0, 9])))
        health.append(HealthSignal(
            seed_id=loc, index=i, epoch=5, state=state, activation_mean=rng.uniform(-1, 1),
            activation_variance=rng.uniform(0, 2), gradient_norm=rng.uniform(0, 0.1), dead_unit_ratio=rng.random(),
            health_score=rng.random(), confidence=rng.random(), samples=rng.randint(1, 20)))
    return SystemStatePacket(epoch=5, step=500, train_loss=1.2, health=tuple(health), seeds=tuple(seeds))


def _median_p99(values: list[float]) -> tuple[float, float]:
    s = sorted(values)
    return statistics.median(s), s[min(int(0.99 * len(s)), len(s) - 1)]


def decision_latency(calls: int, n_seeds: int, policy_file: Path | None, facts: dict[str, Any]
                     ) -> list[dict[str, Any]]:
    cfg = PolicyConfig(health_threshold=0.5, confidence_threshold=0.5)
    vocab = vocabulary(cfg)
    if policy_file is not None:
        net, header = load_policy(policy_file)
    else:
        torch.manual_seed(0)
        net, header = TamiyoGNN(N_FEATURES, 64, 3, len(vocab)), {"vocabulary": list(vocab), "tensors_sha256": ""}
    gnn = GnnPolicy(net, header, cfg, 2)
    heuristic = HeuristicPolicy(cfg, 2)
    packets = [packet(n_seeds, k) for k in range(16)]
    for p in packets[:4]:  # warm-up
        gnn.decide(p)
        heuristic.decide(p)
    gnn.latencies_ms.clear()
    heuristic.latencies_ms.clear()
    build_ms, forward_ms = [], []
    for k in range(calls):
        p = packets[k % len(packets)]
        gnn.decide(p)
        heuristic.decide(p)
        t0 = time.perf_counter()
        g = build_graph(p, gnn.vocab, gnn.layouts, 2)
        t1 = time.perf_counter()
        with torch.inference_mode():
            net(g.x, g.edge_index, g.seed_index)
        t2 = time.perf_counter()
        build_ms.append((t1 - t0) * 1e3)
        forward_ms.append((t2 - t1) * 1e3)
    g_med, g_p99 = _median_p99(gnn.latencies_ms)
    h_med, h_p99 = _median_p99(heuristic.latencies_ms)
    graph = build_graph(packets[0], gnn.vocab, gnn.layouts, 2)
    rec_g = make_record(f"tamiyo_gnn/{n_seeds}seeds", "decision_latency_median", g_med, "ms", "spec target", 10.0,
                        higher_is_better=False, machine_facts=facts)
    rec_g.update(p99_ms=g_p99, calls=calls, graph_build_median_ms=statistics.median(build_ms),
                 forward_median_ms=statistics.median(forward_ms), nodes=int(graph.x.shape[0]),
                 edges=int(graph.edge_index.shape[1]), hidden=net.encode.out_features, layers=len(net.convs),
                 policy_file=str(policy_file) if policy_file else None, gnn_over_heuristic=g_med / h_med)
    rec_h = make_record(f"tamiyo_heuristic/{n_seeds}seeds/same_run", "decision_latency_median", h_med, "ms",
                        "spec target", 1.0, higher_is_better=False, machine_facts=facts)
    rec_h.update(p99_ms=h_p99, calls=calls)
    return [rec_g, rec_h]


def main(argv: list[str] | None = None) -> None:
    def extra(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
        p.add_argument("--policy", type=Path, default=None, help="a trained policy file (default: random weights)")

    args = parse_args(__doc__ or "", argv, extra)
    torch.set_num_threads(args.threads)
    records = decision_latency(100 if args.quick else 1000, 50, args.policy, machine())
    write_results("morph_gnn", records, args.results_dir)


if __name__ == "__main__":
    main()
