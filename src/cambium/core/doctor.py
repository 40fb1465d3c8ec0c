"""`cambium doctor`: what this machine has, and what it can do (measured, not looked up).

It reports versions, torch threads, CPU/RAM, CUDA devices, optional servers and optional Python packages, and
measures the device's fp32 matmul peak (best of several sgemm runs, GFLOP/s) and memory bandwidth (best of several
large copies, GB/s). Measured peaks are kept in `<runs_dir>/device_peaks.json` keyed by a machine fingerprint
(hostname, CPU model, torch version, threads, device), so MFU figures elsewhere use
`load_or_measure_peak(runs_dir, device)` and measure at most once per machine setup.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import psutil
import torch
import typer

from cambium.core.errors import DeviceError, RunError
from cambium.core.files import atomic_write

__all__ = [
    "PEAKS_FILE",
    "DevicePeak",
    "collect_report",
    "cpu_model",
    "doctor_command",
    "find_servers",
    "load_or_measure_peak",
    "machine_facts",
    "machine_fingerprint",
    "measure_matmul_peak",
    "measure_memory_bandwidth",
    "optional_packages",
]

PEAKS_FILE = "device_peaks.json"
KEY_LIBS = ("pydantic", "typer", "rich", "duckdb", "pyarrow", "orjson", "httpx", "websockets", "psutil")
OPTIONAL_PACKAGES = (
    "lightgbm", "sklearn", "scipy", "tiktoken", "tokenizers", "datasets", "transformers", "triton", "matplotlib",
    "redis", "psycopg", "boto3", "playwright", "torchcfm", "numba", "pandas",
)
# Import names whose distribution is named differently.
_DIST_NAMES = {"sklearn": "scikit-learn", "psycopg": "psycopg"}
DEFAULT_MATMUL_N = {"cpu": 1024, "cuda": 8192}
DEFAULT_COPY_MB = {"cpu": 256, "cuda": 1024}


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={str(device)!r} asked for but CUDA is not available on this machine; use 'cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device={str(device)!r}: doctor measures 'cpu' or 'cuda' devices")
    return dev


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _best_time(fn: Any, dev: torch.device, runs: int) -> float:
    fn()  # warm-up: allocator, kernel selection, thread pool start
    _sync(dev)
    best = math.inf
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    return best


def measure_matmul_peak(
    device: str | torch.device = "cpu", n: int | None = None, runs: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best-of-`runs` throughput of an [n, n] @ [n, n] matmul in GFLOP/s (2 n^3 flops per product)."""
    dev = _device(device)
    n = n or DEFAULT_MATMUL_N[dev.type]
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=dev, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=dev, dtype=dtype)
    seconds = _best_time(lambda: torch.mm(a, b, out=out), dev, runs)
    return 2.0 * n**3 / seconds / 1e9


def measure_memory_bandwidth(device: str | torch.device = "cpu", megabytes: int | None = None, runs: int = 5) -> float:
    """Best-of-`runs` copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    dev = _device(device)
    nbytes = (megabytes or DEFAULT_COPY_MB[dev.type]) * 2**20
    src = torch.ones(nbytes // 4, device=dev, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), dev, runs)
    return 2.0 * src.numel() * 4 / seconds / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def machine_facts(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The facts a measured figure depends on (also recorded with every benchmark result)."""
    dev = _device(device)
    mem = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_logical": psutil.cpu_count(logical=True),
        "cpu_physical": psutil.cpu_count(logical=False),
        "ram_gb": round(mem.total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(dev),
        "device_name": _device_name(dev),
    }


def machine_fingerprint(device: str | torch.device = "cpu") -> str:
    """A short stable key: hostname, CPU model, torch version, threads and device (name) hashed."""
    facts = machine_facts(device)
    key = [facts[k] for k in ("hostname", "cpu_model", "torch", "torch_threads", "device", "device_name")]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DevicePeak:
    """Measured figures of one device on one machine setup."""

    fingerprint: str
    device: str
    matmul_gflops: float
    matmul_n: int
    bandwidth_gbs: float
    measured_at: str
    facts: dict[str, Any]

    def mfu(self, achieved_flops_per_s: float) -> float:
        """Model FLOPs utilisation against this measured fp32 matmul peak."""
        return achieved_flops_per_s / (self.matmul_gflops * 1e9)


def _read_peaks(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunError(f"{path}: cannot read measured peaks ({exc}); delete the file to measure again") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object keyed by machine fingerprint; delete it to measure again")
    return data


def load_or_measure_peak(
    runs_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    n: int | None = None,
    runs: int = 5,
    copy_mb: int | None = None,
    remeasure: bool = False,
) -> DevicePeak:
    """The stored peak of this machine and device, measured (and stored) first if missing or `remeasure`.

    A stored record is reused only if it was measured at the same matmul size `n` (default per device type).
    """
    dev = _device(device)
    n = n or DEFAULT_MATMUL_N[dev.type]
    path = Path(runs_dir) / PEAKS_FILE
    data = _read_peaks(path)
    fingerprint = machine_fingerprint(dev)
    record = data.get(fingerprint)
    if remeasure or not isinstance(record, dict) or record.get("matmul_n") != n:
        record = {
            "device": str(dev),
            "matmul_gflops": measure_matmul_peak(dev, n=n, runs=runs),
            "matmul_n": n,
            "bandwidth_gbs": measure_memory_bandwidth(dev, megabytes=copy_mb, runs=runs),
            "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "facts": machine_facts(dev),
        }
        data[fingerprint] = record
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    try:
        return DevicePeak(fingerprint=fingerprint, **{k: record[k] for k in (
            "device", "matmul_gflops", "matmul_n", "bandwidth_gbs", "measured_at", "facts")})
    except KeyError as exc:
        raise RunError(f"{path}: record {fingerprint} lacks {exc}; run `cambium doctor` to measure again") from None


def find_servers() -> dict[str, str | None]:
    """Paths of the optional servers used by integration tests (None when absent)."""
    found: dict[str, str | None] = {name: shutil.which(name) for name in ("redis-server", "pg_ctl", "initdb")}
    for name in ("pg_ctl", "initdb"):
        if found[name] is None:
            candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
            found[name] = candidates[-1] if candidates else None
    return found


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def optional_packages() -> dict[str, str | None]:
    """Installed version of each optional package (None when absent); found without importing them."""
    out: dict[str, str | None] = {}
    for name in OPTIONAL_PACKAGES:
        if importlib.util.find_spec(name) is None:
            out[name] = None
        else:
            out[name] = _dist_version(_DIST_NAMES.get(name, name)) or "installed"
    return out


def _devices() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "cuda": []}
    if torch.cuda.is_available():
        info["cuda_version"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["cuda"].append({"index": i, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                                 "capability": f"{props.major}.{props.minor}"})
    return info


def collect_report(runs_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    """Everything `cambium doctor` shows, as one JSON-ready dict. Measures every available device.

    quick: small sizes and few runs, not stored (a quick figure underestimates the peak); otherwise the measurement
    is stored in `<runs_dir>/device_peaks.json`.
    """
    versions: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _dist_version("numpy"),
        "cambium": _dist_version("cambium"),
    }
    versions.update({lib: _dist_version(lib) for lib in KEY_LIBS})
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    measured: dict[str, Any] = {}
    for dev in devices:
        if quick:
            n = 512
            measured[dev] = {
                "matmul_gflops": measure_matmul_peak(dev, n=n, runs=2),
                "matmul_n": n,
                "bandwidth_gbs": measure_memory_bandwidth(dev, megabytes=16, runs=2),
                "stored": False,
            }
        else:
            peak = load_or_measure_peak(runs_dir, dev, remeasure=True)
            measured[dev] = {"matmul_gflops": peak.matmul_gflops, "matmul_n": peak.matmul_n,
                             "bandwidth_gbs": peak.bandwidth_gbs, "stored": True, "fingerprint": peak.fingerprint}
            if dev.startswith("cuda"):
                measured[dev]["matmul_bf16_gflops"] = measure_matmul_peak(dev, dtype=torch.bfloat16)
    mem = psutil.virtual_memory()
    return {
        "versions": versions,
        "executable": sys.executable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu": {"model": cpu_model(), "logical": psutil.cpu_count(logical=True),
                "physical": psutil.cpu_count(logical=False), "ram_gb": round(mem.total / 2**30, 1),
                "ram_available_gb": round(mem.available / 2**30, 1)},
        "devices": _devices(),
        "measured": measured,
        "peaks_file": None if quick else str(Path(runs_dir) / PEAKS_FILE),
        "servers": find_servers(),
        "optional_packages": optional_packages(),
    }


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="cambium doctor", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, version in report["versions"].items():
        table.add_row(name, version or "[red]missing[/red]")
    cpu = report["cpu"]
    table.add_row("cpu", f"{cpu['model']} ({cpu['physical']} cores, {cpu['logical']} threads), "
                         f"{cpu['ram_gb']} GB RAM ({cpu['ram_available_gb']} GB free)")
    table.add_row("torch threads", f"{report['torch_threads']} intra-op, {report['torch_interop_threads']} inter-op")
    cuda = report["devices"]["cuda"]
    table.add_row("cuda", ", ".join(f"{d['name']} ({d['memory_gb']} GB)" for d in cuda) or "not available")
    for dev, m in report["measured"].items():
        extra = f", bf16 {m['matmul_bf16_gflops']:.0f} GFLOP/s" if "matmul_bf16_gflops" in m else ""
        note = "" if m["stored"] else " (quick, not stored)"
        table.add_row(f"peak {dev}", f"fp32 matmul {m['matmul_gflops']:.1f} GFLOP/s (n={m['matmul_n']}){extra}; "
                                     f"copy {m['bandwidth_gbs']:.1f} GB/s{note}")
    if report["peaks_file"]:
        table.add_row("peaks file", report["peaks_file"])
    for name, path in report["servers"].items():
        table.add_row(name, path or "[yellow]not found[/yellow] (integration tests skip)")
    pkgs = report["optional_packages"]
    table.add_row("optional packages", ", ".join(f"{k} {v}" for k, v in pkgs.items() if v) or "none")
    table.add_row("not installed", ", ".join(k for k, v in pkgs.items() if not v) or "-")
    console.print(table)


def doctor_command(
    quick: Annotated[bool, typer.Option("--quick", help="Small, fast measurements (seconds); not stored.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    runs_dir: Annotated[Path, typer.Option("--runs-dir", help="Where device_peaks.json is kept.")] = Path("runs"),
) -> None:
    """Show versions, CPU/RAM, devices, measured matmul peak and bandwidth, optional servers and packages."""
    report = collect_report(runs_dir, quick=quick)
    if json_output:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)

