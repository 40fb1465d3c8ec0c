"""Memory rules (cambium.nn.memory) against the sequential recurrence and outside references.

Run: `python -m bench.memory [--quick] [--threads N]`. Cases:
  * delta: the exact chunkwise delta rule (WY form, chunk 64) against our token-by-token recurrence and
    flash-linear-attention's pure-PyTorch references (`fla.ops.delta_rule.naive`: `delta_rule_recurrence`,
    `delta_rule_chunkwise`) at T=4096, d=64, forward in inference mode; plus forward+backward of the kernel pair
    against autograd through the recurrence. Records the max |difference| of the outputs as well.
  * titans: a Titans neural memory (2-layer MLP, momentum, decay, chunk-start gradients) against titans-pytorch's
    `NeuralMemory` at a matched config (same width, heads, chunk size, MLP depth/expansion), forward.
Times are the best of interleaved rounds (bench/common.py: the best estimates the uncontended time).
Writes bench/results/memory.json in the bench/common.py convention (ratio > 1: cambium faster) and prints one line
per record, ratio last. fla (pip `fla-core`) and titans-pytorch are bench extras; a missing one is
skipped with a message. fla's package `__init__` needs triton, so its naive.py is loaded by path.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.nn.memory.delta import delta_rule_recurrent
from cambium.nn.memory.delta_kernel import delta_rule_chunkwise


def load_fla_naive(op: str) -> ModuleType | None:
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / op / "naive.py"
    module_spec = importlib.util.spec_from_file_location(f"_fla_naive_{op}", path)
    if module_spec is None or module_spec.loader is None:
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _record(case: str, metric: str, value: float, unit: str, reference: str,
            reference_value: float | None) -> dict[str, Any]:
    return make_record(case, metric, value, unit, reference, reference_value, higher_is_better=False,
                       machine_facts=FACTS)


FACTS: dict[str, Any] = {}


def delta_case(t: int, d: int, heads: int, chunk: int, rounds: int, slow_rounds: int, t_bwd: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1, heads, t, d, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, heads, t, d, generator=gen), dim=-1)
    v = torch.randn(1, heads, t, d, generator=gen)
    beta = torch.sigmoid(torch.randn(1, heads, t, generator=gen))
    case = f"delta (B,H,T,d)=(1, {heads}, {t}, {d}) chunk={chunk}"
    fast: dict[str, Callable[[], Any]] = {"chunkwise": lambda: delta_rule_chunkwise(q, k, v, beta, chunk_size=chunk)}
    slow: dict[str, Callable[[], Any]] = {"recurrence": lambda: delta_rule_recurrent(q, k, v, beta)}
    naive = load_fla_naive("delta_rule")
    scale = d**-0.5
    if naive is not None:
        fast["fla.delta_rule_chunkwise"] = lambda: naive.delta_rule_chunkwise(q, k, v, beta, chunk_size=chunk)
        slow["fla.delta_rule_recurrence"] = lambda: naive.delta_rule_recurrence(q, k, v, beta)
    else:
        print("fla (pip fla-core) not installed: skipping the fla reference")
    with torch.inference_mode():
        o_fast, _ = delta_rule_chunkwise(q * scale, k, v, beta, chunk_size=chunk)
        o_rec, _ = delta_rule_recurrent(q * scale, k, v, beta)
        # The token loops are slow: a few rounds without warm-up; the chunked paths get many rounds.
        times = interleaved_best(fast, rounds) | interleaved_best(slow, slow_rounds, warmup=0)
        out = [_record(case, "forward_seconds", times["chunkwise"], "s", name, times[name])
               for name in times if name != "chunkwise"]
        out.append(_record(case, "max_abs_diff_vs_recurrence", float((o_fast - o_rec).abs().max()), "", "recurrence",
                           None))
        if naive is not None:
            o_fla, _ = naive.delta_rule_recurrence(q, k, v, beta)
            out.append(_record(case, "max_abs_diff_vs_fla", float((o_fast - o_fla).abs().max()), "",
                               "fla.delta_rule_recurrence", None))

    leaves = [x[:, :, :t_bwd].clone().requires_grad_() for x in (q, k, v, beta)]

    def fwd_bwd(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> None:
            o, s = fn(*leaves)
            (o.sum() + s.sum()).backward()
        return run

    times = (interleaved_best({"kernel": fwd_bwd(lambda *a: delta_rule_chunkwise(*a, chunk_size=chunk))}, rounds)
             | interleaved_best({"recurrence": fwd_bwd(delta_rule_recurrent)}, slow_rounds, warmup=0))
    out.append(_record(f"delta fwd+bwd (B,H,T,d)=(1, {heads}, {t_bwd}, {d}) chunk={chunk}", "seconds",
                       times["kernel"], "s", "autograd through recurrence", times["recurrence"]))
    return out


def titans_case(t: int, dim: int, heads: int, chunk: int, rounds: int) -> list[dict]:
    try:
        from titans_pytorch import NeuralMemory
    except ImportError:
        print("titans-pytorch not installed: skipping the Titans case")
        return []
    from cambium.nn.memory.layer import TitansMemory

    torch.manual_seed(0)
    peer = NeuralMemory(dim=dim, chunk_size=chunk, heads=heads, dim_head=dim // heads,
                        default_model_kwargs={"depth": 2, "expansion_factor": 2.0})
    ours = TitansMemory(dim=dim, heads=heads, hidden_mult=2.0, chunk_size=chunk)
    x = torch.randn(1, t, dim)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_peer = sum(p.numel() for p in peer.parameters())
    case = f"titans (B,T,dim,heads)=(1, {t}, {dim}, {heads}) chunk={chunk} mlp 2 layers x2 params {n_ours}/{n_peer}"
    with torch.inference_mode():
        times = interleaved_best({"ours": lambda: ours(x), "peer": lambda: peer(x)}, rounds)
    return [_record(case, "forward_seconds", times["ours"], "s", "titans_pytorch.NeuralMemory", times["peer"])]


def main(argv: list[str] | None = None) -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=int, default=None,
                            help="torch intra-op threads (1 avoids spin-wait collapse on an oversubscribed machine)")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    FACTS.update(machine())
    torch.manual_seed(0)
    if args.quick:
        records = delta_case(t=1024, d=64, heads=1, chunk=64, rounds=3, slow_rounds=1, t_bwd=256)
        records += titans_case(256, 64, 2, 16, 3)
    else:
        records = delta_case(t=4096, d=64, heads=2, chunk=64, rounds=10, slow_rounds=2, t_bwd=1024)
        records += titans_case(1024, 128, 4, 64, 10)
    path = write_results("memory", records, args.results_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
