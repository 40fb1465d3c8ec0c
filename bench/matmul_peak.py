"""fp32 matmul peak and copy bandwidth as `cambium doctor` measures them, against numpy at the same sizes.

Run: `python -m bench.matmul_peak [--quick]`. Cases `matmul_n<N>` (GFLOP/s, 2 N^3 flops per [N, N] @ [N, N]) and
`copy_<M>MB` (GB/s, bytes read + written). Ours is `cambium.core.doctor`'s measurement (torch); the reference is numpy
(`a @ b`, `np.copyto`) on the same machine in the same run, interleaved. A ratio near 1 says the doctor's figure is a
fair peak of this machine (both call an optimised BLAS/memcpy), so MFU computed against it is meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import interleaved_best, machine, make_record, parse_args, write_results
from cambium.core.doctor import measure_matmul_peak, measure_memory_bandwidth


def matmul_case(n: int, rounds: int, facts: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    ours: list[float] = []

    def run_ours() -> None:
        ours.append(measure_matmul_peak("cpu", n=n, runs=1))

    times = interleaved_best({"ours": run_ours, "numpy": lambda: np.matmul(a, b, out=out)}, rounds)
    numpy_gflops = 2.0 * n**3 / times["numpy"] / 1e9
    return make_record(f"matmul_n{n}", "fp32 matmul", max(ours), "GFLOP/s", "numpy", numpy_gflops,
                       higher_is_better=True, machine_facts=facts)


def copy_case(megabytes: int, rounds: int, facts: dict[str, Any]) -> dict[str, Any]:
    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    ours: list[float] = []

    def run_ours() -> None:
        ours.append(measure_memory_bandwidth("cpu", megabytes=megabytes, runs=1))

    times = interleaved_best({"ours": run_ours, "numpy": lambda: np.copyto(dst, src)}, rounds)
    numpy_gbs = 2.0 * src.nbytes / times["numpy"] / 1e9
    return make_record(f"copy_{megabytes}MB", "copy bandwidth", max(ours), "GB/s", "numpy", numpy_gbs,
                       higher_is_better=True, machine_facts=facts)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("fp32 matmul peak and copy bandwidth: cambium doctor vs numpy", argv)
    sizes, mbs, rounds = ([256, 512], [16], 5) if args.quick else ([512, 1024, 2048], [64, 256], 5)
    facts = machine("cpu")
    records = [matmul_case(n, rounds, facts) for n in sizes] + [copy_case(mb, rounds, facts) for mb in mbs]
    write_results("matmul_peak", records, args.results_dir)


if __name__ == "__main__":
    main()
