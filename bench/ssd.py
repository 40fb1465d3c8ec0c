"""Chunked SSD (cambium.nn.ssd) against Mamba's `ssd_minimal_discrete` and the sequential scan.

Run: `python -m bench.ssd [--quick] [--threads N] [--chunk Q]`. Cases (B, L, H, P, N) = (4, 512, 8, 64, 16) and
(1, 2048, 8, 64, 64), forward passes in inference mode, fp32 on CPU, both chunked algorithms with the same chunk length.
Times are the best of interleaved rounds (bench/common.py); ratio > 1 means the chunked path is faster than the
reference. The max |difference| of outputs and final states is recorded too.

The reference is Listing 1 of the Mamba-2 paper as shipped in the mamba-ssm source distribution, fetched at bench time
into a cache outside the repository (nothing of it is committed):
    MAMBA_SKIP_CUDA_BUILD=TRUE pip download --no-deps --no-binary :all: --no-build-isolation mamba-ssm==2.3.2.post1
`mamba_ssm/modules/ssd_minimal.py` imports a Triton kernel at the top, so only its `segsum` and
`ssd_minimal_discrete` function definitions are compiled (through `ast`) with torch, F and einops in scope. einops
is a bench-only dependency.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.nn.ssd import ssd_chunked, ssd_sequential

MAMBA_VERSION = "2.3.2.post1"
CACHE = Path(os.path.expanduser("~/.cache/cambium"))
SHAPES = {"small": (4, 512, 8, 64, 16), "large": (1, 2048, 8, 64, 64)}
MINIMAL = "mamba_ssm.ssd_minimal_discrete"
SEQUENTIAL = "cambium ssd_sequential"


def load_reference(cache: Path = CACHE) -> Callable[..., Any]:
    """`ssd_minimal_discrete` from the mamba-ssm sdist, downloaded into `cache` on first use."""
    sdist = cache / f"mamba_ssm-{MAMBA_VERSION}.tar.gz"
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE"}
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               f"mamba-ssm=={MAMBA_VERSION}", "-d", str(cache)]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    member = f"mamba_ssm-{MAMBA_VERSION}/mamba_ssm/modules/ssd_minimal.py"
    with tarfile.open(sdist) as tar:
        fh = tar.extractfile(member)
        assert fh is not None, member
        source = fh.read().decode()
    tree = ast.parse(source)
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in {"segsum", "ssd_minimal_discrete"}]
    assert len(wanted) == 2, "mamba-ssm layout changed: segsum / ssd_minimal_discrete not found"
    from einops import rearrange, repeat

    namespace: dict[str, Any] = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), member, "exec"), namespace)
    return namespace["ssd_minimal_discrete"]


def inputs(b: int, l: int, h: int, p: int, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [b, l, h, p], dt [b, l, h], A [h], B and C [b, l, h, n] (one B/C group per head, as the reference takes)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, l, h, generator=gen) - 2.0)
    A = -torch.exp(torch.rand(h, generator=gen) * 2.7)  # A in [-15, -1], as Mamba-2 initialises it
    B = torch.randn(b, l, h, n, generator=gen) / n**0.5
    C = torch.randn(b, l, h, n, generator=gen) / n**0.5
    return x, dt, A, B, C


def run_case(name: str, shape: tuple[int, int, int, int, int], chunk: int, rounds: int,
             ref: Callable[..., Any], facts: dict[str, Any]) -> list[dict[str, Any]]:
    b, l, h, p, n = shape
    x, dt, A, B, C = inputs(b, l, h, p, n)
    X, A_disc = x * dt.unsqueeze(-1), dt * A
    case = f"{name} (B,L,H,P,N)={shape} chunk={chunk}"

    def chunked() -> Any:
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk)

    def minimal() -> Any:
        return ref(X, A_disc, B, C, chunk)

    def sequential() -> Any:
        return ssd_sequential(x, dt, A, B, C)

    with torch.inference_mode():
        (y_c, s_c), (y_r, s_r), (y_s, s_s) = chunked(), minimal(), sequential()
        vs_minimal = interleaved_best({"chunked": chunked, "minimal": minimal}, rounds)
        vs_sequential = interleaved_best({"chunked": chunked, "sequential": sequential}, max(2, rounds // 4))
    diff_r = max((y_c - y_r).abs().max().item(), (s_c - s_r).abs().max().item())
    diff_s = max((y_c - y_s).abs().max().item(), (s_c - s_s).abs().max().item())
    return [
        make_record(case, "forward time", vs_minimal["chunked"], "s", MINIMAL, vs_minimal["minimal"],
                    higher_is_better=False, machine_facts=facts),
        make_record(case, "forward time", vs_sequential["chunked"], "s", SEQUENTIAL, vs_sequential["sequential"],
                    higher_is_better=False, machine_facts=facts),
        make_record(case, "max abs diff", diff_r, "abs", MINIMAL, None, higher_is_better=False, machine_facts=facts),
        make_record(case, "max abs diff", diff_s, "abs", SEQUENTIAL, None, higher_is_better=False,
                    machine_facts=facts),
    ]


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk", type=int, default=64, help="chunk length of both chunked algorithms")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv, _extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = load_reference()
    rounds = 4 if args.quick else 16
    facts = machine()
    records = []
    for name, shape in SHAPES.items():
        records += run_case(name, shape, args.chunk, rounds, ref, facts)
    path = write_results("ssd", records, args.results_dir)
    print(f"wrote {path} (load average {facts['load_avg_1m']} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
