"""Strate III sampling throughput: cambium's fixed-step ODE sampler against torchdiffeq on the same velocity net.

Run: `python -m bench.worldmodel_flow [--quick] [--threads N]`. Cases: the Strate III velocity net at the tiny shape
(latent future 2 × 64, context 66, hidden 128, 2 blocks) and the S shape (2 × 256, context 258, hidden 256, 3
blocks), ODE steps 4 / 8 / 16 of the midpoint rule, a batch of 64 contexts × 64 futures = 4,096 trajectories per
call, fp32 on CPU under inference mode. Metric: trajectories per second (best of interleaved rounds,
bench/common.py); ratio > 1 means cambium's sampler is faster.

The peer is `torchdiffeq.odeint(..., method="midpoint")` on a fixed grid of steps + 1 times, the integrator the
torchcfm examples use (torchcfm's own `NeuralODE` path needs torchdyn, which pulls a training framework; torchdiffeq
is a bench-time extra: `pip install -c constraints.txt torchdiffeq`). Both integrate the same net from the same noise,
so their samples agree to float rounding: the max |difference| is recorded too.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.worldmodel.flow import VelocityNet, integrate

SHAPES = {"tiny": (128, 66, 128, 2), "S": (512, 258, 256, 3)}  # (dim, cond_dim, hidden, n_layers)
CONTEXTS, FUTURES = 64, 64
PEER = "torchdiffeq.odeint midpoint"


def run_case(name: str, shape: tuple[int, int, int, int], steps: int, rounds: int,
             facts: dict[str, Any]) -> list[dict[str, Any]]:
    from torchdiffeq import odeint

    dim, cond_dim, hidden, layers = shape
    torch.manual_seed(0)
    net = VelocityNet(dim, cond_dim, hidden, layers).eval()
    gen = torch.Generator().manual_seed(0)
    n = CONTEXTS * FUTURES
    cond = torch.randn(CONTEXTS, cond_dim, generator=gen).repeat_interleave(FUTURES, 0)
    x0 = torch.randn(n, dim, generator=gen)
    grid = torch.linspace(0.0, 1.0, steps + 1)

    def ours() -> torch.Tensor:
        return integrate(lambda x, t: net(x, t, cond), x0, steps, "midpoint")

    def peer() -> torch.Tensor:
        return odeint(lambda t, x: net(x, t.expand(x.shape[0]), cond), x0, grid, method="midpoint")[-1]

    with torch.inference_mode():
        diff = float((ours() - peer()).abs().max())
        best = interleaved_best({"cambium": ours, "peer": peer}, rounds)
    case = f"{name} dim={dim} hidden={hidden} steps={steps} trajectories={n}"
    return [
        make_record(case, "sampling throughput", n / best["cambium"], "trajectories/s", PEER, n / best["peer"],
                    higher_is_better=True, machine_facts=facts),
        make_record(case, "max abs diff", diff, "abs", PEER, None, higher_is_better=False, machine_facts=facts),
    ]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, _extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else 6
    facts = machine()
    records = []
    for name, shape in SHAPES.items():
        for steps in (4, 8, 16):
            records += run_case(name, shape, steps, rounds, facts)
    path = write_results("worldmodel_flow", records, args.results_dir)
    print(f"wrote {path} (load average {facts['load_avg_1m']} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
