"""The exact-resume harness: kill a trainer with SIGKILL, resume it, and demand bitwise-identical metrics.

`check_exact_resume(command, runs_root=..., n_steps=...)` runs three scenarios of the same trainer command:

1. `reference`: run to the end uninterrupted;
2. `kill-at-step`: start again, SIGKILL the process when it has finished step k, resume it to the end;
3. `kill-in-checkpoint`: start again, SIGKILL the process while it is writing a checkpoint, resume it to the end;

and compares the metric rows (step, tokens_or_events, name, value; not wall_time) of 2 and 3 with those of 1, value
bits included (a NaN equals the same NaN). Metrics named `perf/...` (throughput, MFU, step time: wall-clock figures no
rerun reproduces) are not compared; trainers put every timing-derived metric under that prefix.

The trainer speaks a small protocol, driven by environment variables the harness sets (read at
the trainer's entry point with `cambium.core.progress.ProgressReporter.from_env()`; nothing else looks at them):

    CAMBIUM_TEST_PROGRESS=<file>        append one line per event: "run <id>", "resumed <step>", "step <n>",
                                        "ckpt-file <step> <path>", "ckpt-saved <step>"
    CAMBIUM_TEST_HOLD_STEP=<k>          after reporting "step k", sleep so the harness kills at exactly that point
    CAMBIUM_TEST_HOLD_CHECKPOINT=<s>    in the first checkpoint write of a step >= s, sleep after its first file

A resume is started with `resume_command(run_id)`, by default `command + ["--resume", run_id]`.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cambium.core.errors import CambiumError
from cambium.core.metrics import read_metrics
from cambium.core.progress import ENV_HOLD_CHECKPOINT, ENV_HOLD_STEP, ENV_PROGRESS

__all__ = [
    "ENV_HOLD_CHECKPOINT",
    "ENV_HOLD_STEP",
    "ENV_PROGRESS",
    "PERF_PREFIX",
    "SCENARIOS",
    "ResumeReport",
    "ResumeTestError",
    "ScenarioReport",
    "check_exact_resume",
    "compare_rows",
    "metric_key_rows",
]

PERF_PREFIX = "perf/"
SCENARIOS = ("kill-at-step", "kill-in-checkpoint")

KeyRow = tuple[int, int, str, bytes]
T = TypeVar("T")


class ResumeTestError(CambiumError):
    """The trainer did not follow the harness protocol (exited early, never reached the kill point, failed)."""


@dataclass
class ScenarioReport:
    name: str
    run_id: str
    kill_step: int | None = None
    killed_checkpoint_step: int | None = None
    killed_in_temp_dir: bool | None = None
    rows_on_disk_at_kill: int | None = None
    max_step_on_disk_at_kill: int | None = None
    resumed_from: int | None = None
    rows: int = 0
    identical: bool = True
    first_difference: str | None = None
    seconds: float = 0.0


@dataclass
class ResumeReport:
    n_steps: int
    seed: int | None
    reference: ScenarioReport
    scenarios: list[ScenarioReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.identical for s in self.scenarios)

    def summary(self) -> str:
        lines = [f"reference {self.reference.run_id}: {self.reference.rows} rows, {self.reference.seconds:.1f} s"]
        for s in self.scenarios:
            where = (f"step {s.kill_step}" if s.killed_checkpoint_step is None
                     else f"checkpoint write of step {s.killed_checkpoint_step}")
            verdict = "identical" if s.identical else f"DIFFERENT: {s.first_difference}"
            lines.append(f"{s.name} {s.run_id}: SIGKILL at {where}, resumed from step {s.resumed_from}, "
                         f"{s.rows} rows {verdict} ({s.seconds:.1f} s)")
        return "\n".join(lines)


def metric_key_rows(path: str | Path, run_id: str | None = None) -> list[KeyRow]:
    """(step, tokens_or_events, name, value bits) of every row, in (step, name) order: what must match exactly.

    Rows named `perf/...` are left out: they hold wall-clock figures (throughput, MFU, step time), the one kind of
    metric that no rerun reproduces. Trainers put every timing-derived metric under that prefix.
    """
    return [(r.step, r.tokens_or_events, r.name, struct.pack("<d", r.value))
            for r in read_metrics(path, run_id=run_id) if not r.name.startswith(PERF_PREFIX)]


def check_exact_resume(
    command: Sequence[str],
    *,
    runs_root: str | Path,
    n_steps: int,
    kill_step: int | None = None,
    checkpoint_kill_step: int | None = None,
    resume_command: Callable[[str], Sequence[str]] | None = None,
    metrics_path: Callable[[str], Path] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    seed: int | None = None,
    timeout_s: float = 300.0,
    scenarios: Sequence[str] = SCENARIOS,
    reference_run_id: str | None = None,
    parallel: bool = True,
) -> ResumeReport:
    """Run the scenarios described in the module docstring and return their report.

    `kill_step` defaults to a step drawn uniformly from [1, n_steps - 1] with `random.Random(seed)`;
    `checkpoint_kill_step` to n_steps // 2 (the kill lands in the first checkpoint written at or after it).
    `metrics_path(run_id)` defaults to `runs_root/<run_id>/metrics.duckdb`. `reference_run_id` reuses a finished
    uninterrupted run instead of running the reference again; `scenarios` picks a subset of SCENARIOS. With
    `parallel` the reference and the scenarios (separate processes and runs) go at the same time; the trainer must
    then give the same numbers whatever the load, e.g. by fixing its thread count.
    """
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ResumeTestError(f"unknown scenarios {sorted(unknown)}; choose from {SCENARIOS}")
    runs_root = Path(runs_root)
    if n_steps < 2:
        raise ResumeTestError(f"n_steps={n_steps} must be >= 2 to leave room for a kill")
    rng = random.Random(seed)
    kill_step = kill_step if kill_step is not None else rng.randint(1, n_steps - 1)
    if not 1 <= kill_step < n_steps:
        raise ResumeTestError(f"kill_step={kill_step} must be in [1, n_steps - 1] = [1, {n_steps - 1}]")
    checkpoint_kill_step = checkpoint_kill_step if checkpoint_kill_step is not None else n_steps // 2
    resume_command = resume_command or (lambda run_id: [*command, "--resume", run_id])
    metrics_path = metrics_path or (lambda run_id: runs_root / run_id / "metrics.duckdb")
    holds = {"kill-at-step": {ENV_HOLD_STEP: str(kill_step)},
             "kill-in-checkpoint": {ENV_HOLD_CHECKPOINT: str(checkpoint_kill_step)}}
    with tempfile.TemporaryDirectory(prefix="cambium-resume-") as work, \
            ThreadPoolExecutor(max_workers=1 + len(scenarios) if parallel else 1) as pool:
        runner = _Runner(dict(os.environ if env is None else env), cwd, timeout_s, Path(work), metrics_path)
        reference_job = pool.submit(_timed, runner.run, command, "reference") if reference_run_id is None else None
        jobs = [pool.submit(_timed, runner.kill_and_resume, name, command, resume_command, holds[name])
                for name in scenarios]
        seconds = 0.0
        if reference_job is not None:
            (ref_id, _), seconds = reference_job.result()
        else:
            assert reference_run_id is not None
            ref_id = reference_run_id
        reference_rows = metric_key_rows(metrics_path(ref_id), ref_id)
        reference = ScenarioReport("reference", ref_id, rows=len(reference_rows), seconds=seconds)
        report = ResumeReport(n_steps=n_steps, seed=seed, reference=reference)
        for job in jobs:
            scenario, elapsed = job.result()
            scenario.seconds = elapsed
            on_disk = metric_key_rows(metrics_path(scenario.run_id), scenario.run_id)
            scenario.rows = len(on_disk)
            scenario.identical, scenario.first_difference = compare_rows(reference_rows, on_disk)
            report.scenarios.append(scenario)
    return report


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    t0 = time.monotonic()
    return fn(*args), time.monotonic() - t0


class _Runner:
    def __init__(self, env: dict[str, str], cwd: str | Path | None, timeout_s: float, work: Path,
                 metrics_path: Callable[[str], Path]) -> None:
        for key in (ENV_PROGRESS, ENV_HOLD_STEP, ENV_HOLD_CHECKPOINT):
            env.pop(key, None)
        self.env = env
        self.cwd = cwd
        self.timeout_s = timeout_s
        self.work = work
        self.metrics_path = metrics_path

    def _progress_file(self, label: str) -> Path:
        return self.work / f"{label}.progress"

    def run(self, argv: Sequence[str], label: str, extra_env: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
        """Run to completion; returns (run id, progress lines)."""
        progress = self._progress_file(label)
        env = {**self.env, ENV_PROGRESS: str(progress), **(extra_env or {})}
        try:
            proc = subprocess.run(list(argv), env=env, cwd=self.cwd, capture_output=True, text=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            raise ResumeTestError(f"{label}: {' '.join(argv)} did not finish in {self.timeout_s} s") from None
        lines = _lines(progress)
        if proc.returncode != 0:
            raise ResumeTestError(f"{label}: {' '.join(argv)} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
        return _run_id(lines, label), lines

    def kill_and_resume(self, name: str, command: Sequence[str], resume_command: Callable[[str], Sequence[str]],
                        hold: Mapping[str, str]) -> ScenarioReport:
        progress = self._progress_file(name)
        env = {**self.env, ENV_PROGRESS: str(progress), **hold}
        stderr_path = progress.with_suffix(".stderr")
        with stderr_path.open("w") as stderr:
            proc = subprocess.Popen(list(command), env=env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + self.timeout_s
        hold_step = int(hold[ENV_HOLD_STEP]) if ENV_HOLD_STEP in hold else None
        hold_ckpt = int(hold[ENV_HOLD_CHECKPOINT]) if ENV_HOLD_CHECKPOINT in hold else None
        report: ScenarioReport | None = None
        try:
            while report is None:
                lines = _lines(progress)
                report = _kill_point(name, lines, hold_step, hold_ckpt)
                if report is not None:
                    break
                if proc.poll() is not None:
                    raise ResumeTestError(f"{name}: the trainer exited (code {proc.returncode}) before reaching the "
                                          f"kill point; progress: {lines[-5:]}\n{stderr_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise ResumeTestError(f"{name}: the trainer did not reach the kill point in {self.timeout_s} s")
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != -signal.SIGKILL:
            raise ResumeTestError(f"{name}: the trainer ended with {proc.returncode} instead of being killed")
        if report.killed_checkpoint_step is not None:
            last_file = [line for line in _lines(progress) if line.startswith("ckpt-file ")][-1]
            temp_file = Path(last_file.split(" ", 2)[2])
            report.killed_in_temp_dir = temp_file.parent.name.startswith(".tmp-") and temp_file.parent.exists()
        path = self.metrics_path(report.run_id)
        rows = metric_key_rows(path, report.run_id) if path.exists() else []
        report.rows_on_disk_at_kill = len(rows)
        report.max_step_on_disk_at_kill = max((r[0] for r in rows), default=None)
        _, resumed_lines = self.run(resume_command(report.run_id), f"{name}-resume")
        resumed = [int(line.split()[1]) for line in resumed_lines if line.startswith("resumed ")]
        report.resumed_from = resumed[0] if resumed else None
        return report


def _kill_point(name: str, lines: list[str], hold_step: int | None,
                hold_ckpt: int | None) -> ScenarioReport | None:
    run_id = next((line.split()[1] for line in lines if line.startswith("run ")), None)
    if run_id is None:
        return None
    if hold_step is not None:
        if f"step {hold_step}" in lines:
            return ScenarioReport(name, run_id, kill_step=hold_step)
        return None
    files = [line for line in lines if line.startswith("ckpt-file ") and int(line.split()[1]) >= (hold_ckpt or 0)]
    if files:
        step = int(files[0].split()[1])
        done = [int(line.split()[1]) for line in lines if line.startswith("step ")]
        return ScenarioReport(name, run_id, kill_step=max(done, default=0), killed_checkpoint_step=step)
    return None


def _lines(path: Path) -> list[str]:
    """Complete lines only: a line still being written has no newline yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def _run_id(lines: list[str], label: str) -> str:
    for line in lines:
        if line.startswith("run "):
            return line.split()[1]
    raise ResumeTestError(f"{label}: the trainer never reported its run id (a 'run <id>' progress line)")


def compare_rows(expected: list[KeyRow], actual: list[KeyRow]) -> tuple[bool, str | None]:
    """(True, None) when the rows are identical, else (False, the first difference in words)."""
    for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            return False, f"row {i}: expected {_show(a)}, got {_show(b)}"
    if len(expected) != len(actual):
        return False, f"expected {len(expected)} rows, got {len(actual)}"
    return True, None


def _show(row: KeyRow) -> str:
    step, tokens, name, bits = row
    return f"(step={step}, tokens_or_events={tokens}, {name}={struct.unpack('<d', bits)[0]!r})"
