"""Strate IV planning latency: one TD-MPC2 MPPI decision (`TDMPC2Agent.act`, CVaR objective) on the CPU.

Run: `python -m bench.worldmodel_mppi [--quick] [--threads N]`. The spec's target is < 100 ms per decision at the
origin's planner shapes. The spec gives no planner shapes; the origin's agent follows TD-MPC2, so the reference
repository's published defaults stand for them:

- `reference-defaults`: latent 512, MLPs 512 wide, 5 critics (101 atoms, the reference's 101 histogram bins),
  horizon 3, 6 MPPI iterations of 512 sequences (24 from the policy prior), 64 elites;
- `cambium-default`: the same planner over `TDMPCConfig()`'s model (latent 64, width 128, 5 critics of 16 atoms);
- `cpu-planner`: that model with the planner suggested for CPU runs (4 iterations of 256 sequences, 32 elites, 16
  from the policy prior).

The observation has 264 values (the S config's latent 256 + 2 volatility + 3 Multiverse + 2 bar features + the
position). Metric: milliseconds per decision (best of interleaved rounds, bench/common.py), fp32, CVaR at α = 0.25,
untrained weights (the cost does not depend on them; the reward and critic output layers, zero at initialisation,
are drawn at random so that sequences do not tie). Peers measured in the same run: the same planner with the CVaR
objective off (α = 1, the reference's risk-neutral mean; the ratio says what CVaR costs), and the per-sample loop
reference `mppi_plan_reference` (one decision, timed once; --quick runs it at 64 sequences and 2 iterations), whose
action is compared with the vectorised planner's on the same noise (max |difference| recorded).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.worldmodel.mppi import PlannerConfig, draw_noise, mppi_plan, mppi_plan_reference
from cambium.worldmodel.tdmpc import TDMPC2Agent, TDMPCConfig

OBS_DIM = 264
REFERENCE_PLANNER = PlannerConfig(horizon=3, iterations=6, samples=512, elites=64, policy_trajectories=24,
                                  cvar_alpha=0.25)
CPU_PLANNER = PlannerConfig(horizon=3, iterations=4, samples=256, elites=32, policy_trajectories=16, cvar_alpha=0.25)
CASES = {
    "reference-defaults": TDMPCConfig(latent_dim=512, hidden_dim=512, critics=5, quantiles=101,
                                      planner=REFERENCE_PLANNER),
    "cambium-default": TDMPCConfig(planner=REFERENCE_PLANNER),
    "cpu-planner": TDMPCConfig(planner=CPU_PLANNER),
}


def run_case(name: str, cfg: TDMPCConfig, rounds: int, quick: bool, facts: dict[str, Any]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    agent = TDMPC2Agent(cfg, OBS_DIM, 1, seed=0)
    with torch.no_grad():  # the zero-initialised reward and critic outputs would make every sequence tie
        agent.model.critic.out.weight.normal_(0, 0.5)
        agent.model.reward_head[-1].weight.normal_(0, 0.5)
    neutral = TDMPC2Agent(cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"cvar_alpha": 1.0})}),
                          OBS_DIM, 1, seed=0)
    neutral.model.load_state_dict(agent.model.state_dict())
    obs = np.random.default_rng(0).normal(size=OBS_DIM).astype(np.float32)
    best = interleaved_best({"cvar": lambda: agent.act(obs), "mean": lambda: neutral.act(obs)}, rounds)
    p = cfg.planner
    case = (f"{name} latent={cfg.latent_dim} width={cfg.hidden_dim} H={p.horizon} samples={p.samples} "
            f"iters={p.iterations} alpha={p.cvar_alpha}")
    records = [make_record(case, "decision latency", best["cvar"] * 1e3, "ms", "same planner, CVaR off (alpha=1)",
                           best["mean"] * 1e3, higher_is_better=False, machine_facts=facts)]
    loop_cfg = p.model_copy(update={"samples": 64, "elites": 8, "policy_trajectories": 4, "iterations": 2}) if quick \
        else p
    with torch.no_grad():
        z = agent.model.encode(torch.from_numpy(obs)[None])
        noise = draw_noise(loop_cfg, 1, cfg.critics, torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        fast = mppi_plan(agent.model, z, loop_cfg, noise, discount=cfg.discount)
        fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = mppi_plan_reference(agent.model, z, loop_cfg, noise, discount=cfg.discount)
        slow_s = time.perf_counter() - t0
    loop_case = f"{name} samples={loop_cfg.samples} iters={loop_cfg.iterations} (vs loop reference)"
    records += [
        make_record(loop_case, "decision latency", fast_s * 1e3, "ms", "mppi_plan_reference (per-sample loop)",
                    slow_s * 1e3, higher_is_better=False, machine_facts=facts),
        make_record(loop_case, "max abs action diff", float((fast - slow).abs().max()), "abs",
                    "mppi_plan_reference (per-sample loop)", None, higher_is_better=False, machine_facts=facts),
    ]
    return records


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, _extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 10
    facts = machine()
    records = []
    for name, cfg in CASES.items():
        records += run_case(name, cfg, rounds, args.quick, facts)
    path = write_results("worldmodel_mppi", records, args.results_dir)
    print(f"wrote {path} (load average {facts['load_avg_1m']} on {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
