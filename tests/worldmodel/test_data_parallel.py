"""Data parallel through the core loop: the micro pipeline under torchrun with 2 gloo ranks trains Strate I, Strate II
and Strate III on the same global batches as one process, so their losses agree within fp32 tolerance."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cambium.core.metrics import read_metrics
from cambium.core.runs import list_runs

from .test_pipeline import MICRO, REPO, TINY

# Strate II's VICReg terms see every rank's rows (gathered), its MSE the global count: the 2-rank loss is the
# 1-process loss up to summation order, and Adam carries that rounding through the steps.
RTOL = 2e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pipeline(runs: Path, ranks: int) -> dict[str, list[tuple[int, float]]]:
    args = ["-m", "cambium.worldmodel.cli", "pipeline", "--config", str(TINY), "--runs-dir", str(runs),
            "--stop-phase", "5"]
    for item in MICRO:
        args += ["--set", item]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                  f"--master-port={_free_port()}", "--master-addr=127.0.0.1"]
        command = [*launch, *args]
    else:
        command = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = list_runs(runs)
    assert run.status == "finished"
    out: dict[str, list[tuple[int, float]]] = {}
    for r in read_metrics(run.dir / "metrics.duckdb"):
        if r.name.startswith(("tokenizer/", "jepa/", "flow/")) and not r.name.startswith("perf/"):
            out.setdefault(r.name, []).append((r.step, r.value))
    return out


@pytest.mark.timeout(900)
def test_two_gloo_ranks_train_like_one_process(tmp_path: Path) -> None:
    one = _pipeline(tmp_path / "one", 1)
    two = _pipeline(tmp_path / "two", 2)
    assert set(one) == set(two) and {"tokenizer/loss", "jepa/loss", "jepa/variance", "jepa/holdout_loss",
                                           "flow/loss", "flow/nll", "flow/holdout_cfm"} <= set(one)
    for name in sorted(one):
        steps_one, values_one = zip(*one[name], strict=True)
        steps_two, values_two = zip(*two[name], strict=True)
        assert steps_one == steps_two, name
        assert values_two == pytest.approx(values_one, rel=RTOL, abs=1e-6), name
