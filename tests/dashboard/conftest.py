"""Runs for the dashboard tests, made once per session by the real trainers on the tiny configs, and the dashboard
served on a free loopback port.

Session `runs`: two moe runs that differ in `optim.expert_lr` (curves, expert heatmaps, comparison), a morph run
(seed timeline), a worldmodel run (probe table and report images) and a nested build with its eval.json. About 35 s
on 2 cores.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cambium.core.config import load

REPO = Path(__file__).resolve().parents[2]
WM_MICRO = [
    'data.symbols=["BTCUSDT","ETHUSDT"]', "tokenizer.hidden_channels=16", "jepa.seq_len=8",
    "jepa.encoder.d_model=16", "jepa.encoder.n_layers=1", "jepa.encoder.n_heads=2", "jepa.encoder.chunk_size=8",
    "jepa.predictor.hidden_dim=32", "train_tokenizer.steps=4", "train_tokenizer.batch_size=8",
    "train_jepa.steps=8", "train_jepa.batch_size=4", "pipeline.checkpoint_every=4", "pipeline.threads=1",
    "evaluation.report_examples=2", f"data.klines_glob={REPO}/data/samples/market/klines_1h_futures/*.csv.gz",
]


@dataclass(frozen=True)
class Runs:
    root: Path
    moe: tuple[str, str]
    morph: str
    worldmodel: str
    nested: str


def _moe_runs(root: Path, work: Path) -> tuple[str, str]:
    from cambium.data.mixture import prepare_mixture
    from cambium.moe.config import MoEConfig
    from cambium.moe.train import train

    tiny = REPO / "configs" / "moe" / "tiny.toml"
    mixture = work / "moe-mixture"
    base = [f"data.mixture.out_dir={mixture}"]
    prepare_mixture(load(tiny, MoEConfig, base).data.mixture)  # dataset paths are relative to the repository
    ids = []
    for lr in ("0.003", "0.001"):
        cfg = load(tiny, MoEConfig, [*base, "train.max_steps=30", "train.eval_every=15", "train.checkpoint_every=30",
                                     "train.expert_stats_every=2", "train.eval_windows=2", f"optim.expert_lr={lr}"])
        # measure_peak: the MFU curve, against this machine's matmul peak (measured once, kept in the runs dir).
        ids.append(train(cfg, root, show_progress=False, measure_peak=True).run_id)
    return ids[0], ids[1]


def _morph_run(root: Path, work: Path) -> str:
    from cambium.morph.config import CONFIG_MODEL
    from cambium.morph.train import train

    cfg = load(REPO / "configs" / "morph" / "tiny.toml", CONFIG_MODEL,
               [f"library.root={work}/urza", "train.epochs=3", "data.limit=256"])
    return str(train(cfg, name="tiny", runs_root=root, show_progress=False)["run_id"])


def _worldmodel_run(root: Path) -> str:
    from cambium.worldmodel.config import CONFIG_MODEL
    from cambium.worldmodel.pipeline import run_pipeline

    cfg = load(REPO / "configs" / "worldmodel" / "tiny.toml", CONFIG_MODEL, WM_MICRO)
    return run_pipeline(cfg, root, show_progress=False).run_id


def _nested_run(root: Path, work: Path) -> str:
    from cambium.data.mixture import prepare_mixture
    from cambium.nested.build import build, evaluate_run
    from cambium.nested.config import NestedConfig

    tiny = REPO / "configs" / "nested" / "tiny.toml"
    over = [f"context.mixture.out_dir={work}/nested-mixture", "context.mixture.tokenizer.train_chars=60000"]
    spec = load(tiny, NestedConfig, over).context.mixture
    prepare_mixture(spec.model_copy(update={"datasets": tuple(d.model_copy(update={"path": REPO / d.path})
                                                              for d in spec.datasets)}))
    result = build(load(tiny, NestedConfig, [*over, "build.steps=12", "build.eval_every=12"]), root,
                   show_progress=False)
    evaluate_run(root, result.run_id, max_chunks=4)
    return result.run_id


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    work = tmp_path_factory.mktemp("dashboard")
    root = work / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        moe = _moe_runs(root, work)
        morph = _morph_run(root, work)
        worldmodel = _worldmodel_run(root)
        nested = _nested_run(root, work)
    finally:
        torch.set_num_threads(threads)
    return Runs(root, moe, morph, worldmodel, nested)


class Server:
    """uvicorn serving `create_app(root)` on 127.0.0.1 in a daemon thread."""

    def __init__(self, root: Path) -> None:
        import uvicorn

        from cambium.dashboard.app import create_app

        self.server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=free_port(),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="dashboard-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the dashboard test server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def server(runs: Runs) -> Iterator[str]:
    srv = Server(runs.root)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $CAMBIUM_TEST_ARTIFACTS/dashboard, else a pytest temporary directory."""
    base = os.environ.get("CAMBIUM_TEST_ARTIFACTS")
    out = Path(base) / "dashboard" if base else tmp_path_factory.mktemp("dashboard-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    print(f"\ndashboard screenshots go to {out}")
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian chromium driven by Playwright; skipped where either is missing, a failure under CI.

    Module scope, not session: Playwright's sync API keeps an asyncio loop running in the main thread while it is
    open, and every later test that calls `asyncio.run` would fail with "cannot be called from a running event loop".
    """
    import shutil

    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None  # type: ignore[assignment]
    if executable is None or sync_playwright is None:
        what = "chromium" if executable is None else "playwright"
        if os.environ.get("CI"):
            pytest.fail(f"{what} is not installed; .ci/run must install it")
        pytest.skip(f"{what} is not installed (apt-get install -y chromium; pip install playwright)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()
