"""Every field of every shipped config is read by its system's real entry point (issue 13: a setting that nothing reads
is a bug; it used to pass, e.g. `cms.periods` in nested and `device` in the world-model configs).

Each file under configs/<system>/ is run the way a user runs it, up to and including the first training steps or the
first processed events, with `tests/config_reads.record_reads` logging which fields the code reads:

- moe, nested: the `tiny` config prepares its mixture and trains through `core.loop` (`moe.train.train`,
  `nested.build.build`) over a schedule shrunk to three steps that still passes warm-up, the stable phase and the
  decay (one step would leave the schedule's later fields unread). Every other config is large: its task is built
  with the model on the meta device (`torch.device("meta")`) over the tiny config's mixture, and takes no step.
- screener: `replay` of the committed captures into a Parquet store (`screener replay --store`), then the live path
  (`run_with_status`: a registered live run, status page and status.json, notifiers, connector, depth snapshots
  from a mock REST endpoint) on the first frames served by the local replay server; a `train*` config (and a
  variant with `train.*` overrides) runs `screener train` instead, shortened (fewer folds, trees and bootstrap
  resamples).
- market: `market import` of a committed candle file into the store, `market download` for both markets from a local
  fake Binance whose first answer is a 502 (so the retry settings are read), and `market record` (both venues built,
  the futures one connected to the local replay server).

A leaf value that the run left unread fails the test when
1. it differs from its default (the file sets something that nothing used), or
2. nothing reads that field in any run of the system: the shipped configs plus `VARIANTS`, which switch on what the
   shipped files leave off (gqa attention, the tiktoken tokenizer, other memory rules, notifiers, profile A, ...).
   A default on a branch that a file does not take (moe `attention.head_dim` under MLA) is fine; one that no branch
   takes (nested `cms.*`, now refused) is not.
For a large config, the fields that only the train step, the loop and mixture preparation read (`STEP_ONLY`: the loop
settings, the schedule, the data, nested's memory rule) count as read when another run of the system read the same
field: that is the same code at every size. A `Literal` of one value (a union member's `kind`) is a tag: choosing the
class is its use.

morph's tiny run goes on long enough (with its TRAINING gate open) for a seed to pass every lifecycle state, and
runs `morph compare` too, the one reader of `compare.*`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import torch
from pydantic import model_validator
from tests.config_reads import ReadLog, leaves, record_reads

from cambium.core.config import ConfigModel, fingerprint, load, load_data, to_toml
from cambium.core.loop import DeviceContext

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SAMPLES = REPO / "data" / "samples"
META = DeviceContext(torch.device("meta"))


@dataclass(frozen=True)
class Case:
    """A run of `configs/<system>/<name>.toml` with `overrides` (which shorten a run; none hides a read). `large`: the
    model is built on the meta device and takes no step; `prep_only`: only the data is prepared (`moe prep-mixture`)."""

    system: str
    name: str
    overrides: tuple[str, ...] = ()
    large: bool = False
    prep_only: bool = False

    @property
    def path(self) -> Path:
        return CONFIGS / self.system / f"{self.name}.toml"


@dataclass
class Run:
    cfg: ConfigModel
    reads: ReadLog
    large: bool


# What a variant switches on, run on the system's tiny (or default) config; variants only lend their reads to defaults.
VARIANTS: dict[str, list[Case]] = {
    "worldmodel": [
        # The nested-memory backbone (its memory_rule) is built like a large config, on the meta device.
        Case("worldmodel", "tiny", ("jepa.encoder.backbone=nested", "jepa.encoder.memory_rule=titans_lmm"),
             large=True),
    ],
    "moe": [
        Case("moe", "tiny", ("model.attention.kind=gqa", "model.attention.n_kv_heads=2", "model.attention.head_dim=16"),
             large=True),
        # o200k's 200k-token vocabulary is too large for a tiny training step: preparation reads the tokenizer.
        Case("moe", "tiny", ("data.mixture.tokenizer.kind=tiktoken",), prep_only=True),
    ],
    "nested": [
        Case("nested", "tiny", ("model.memory.execution=recurrent", "model.memory.structure=mlp",
                                "model.memory.bias=huber", "model.memory.algorithm=newton_schulz")),
        Case("nested", "tiny", ("model.memory.execution=recurrent", "model.memory.bias=lp",
                                "model.memory.retention=elastic_net", "model.memory.l1=0.01",
                                "model.memory.read=softmax", "model.memory.omega_window=2")),
        Case("nested", "tiny", ("model.memory.rule=trellis", "model.memory.execution=recurrent")),
        Case("nested", "tiny", ("cms.periods=[1, 2]", "cms.combine=mix", "model.persistent_tokens=2")),
        Case("nested", "tiny", ("context.mixture.tokenizer.kind=tiktoken",), prep_only=True),
    ],
    "screener": [
        Case("screener", "default", (
            "scorer.profile=A", "status.trap_min_toxic=0", "status.tradeable_max_toxic=0",
            "notify.terminal.enabled=true", "notify.webhook.enabled=true", "notify.webhook.url=http://127.0.0.1:9/x",
            "notify.telegram.enabled=true", "notify.telegram.chat_id=1", "notify.telegram.api_url=http://127.0.0.1:9",
            "explain.llm_enabled=true", "explain.llm_url=http://127.0.0.1:9/v1/chat/completions")),
        # `screener train` on the committed 1 m klines (the shipped train-ticks.toml trains on the captures)
        Case("screener", "default", ("train.max_rows_per_file=6000", "train.calibration=platt")),
    ],
    "market": [],
}
# Read only by a train step (nested: the memory rule runs in the forward pass), the loop or mixture preparation.
STEP_ONLY = {
    "moe": ("train.", "schedule.", "data."),
    "nested": ("build.", "context.", "model.memory."),
    "worldmodel": ("size", "data.", "tokenizer.revin_eps", "tokenizer.huber_delta", "jepa.masking.", "jepa.vicreg.",
                   "jepa.ema.", "train_tokenizer.", "train_jepa.", "evaluation.", "pipeline.", "flow.", "train_flow.",
                   "forecast.", "env.", "agents.", "ppo.", "backtest.", "tdmpc.", "multiverse."),
    "morph": ("lifecycle.", "compare.", "data.", "train."),
}
LARGE = {"moe": {"dense-cpu", "moonlet-cpu", "moonlet", "moonlight"},
         "nested": {"mag-cpu", "swa-cpu", "mal-cpu", "mac-cpu", "full-cpu"},
         "worldmodel": {"s", "m", "l", "xl", "cpu", "cpu-long"}, "morph": {"cifar10-cpu"}}
SKIPPED: dict[str, str] = {}
# Defaults read only on a path that a config run cannot reach deterministically, each with the test that reads it.
ELSEWHERE = {
    "moe": {"train.expert_parallel": "read only under torchrun with several ranks: tests/moe/test_parallel.py::"
            "test_two_gloo_processes_give_the_one_process_losses"},
    "morph": {"lifecycle.compile_timeout_epochs": "read only when a compile is still in flight at a boundary "
              "(await_compiles = false): tests/morph/test_safety.py::"
              "test_a_compile_still_in_flight_after_the_timeout_is_culled",
              "library.worker_wait_s": "read only with compile workers in other processes (compile_in = workers, "
              "needs Redis): tests/integration/test_distributed.py::"
              "test_a_run_whose_compile_worker_is_killed_mid_job_loses_nothing",
              "controller.policy": "read only with controller.kind = 'gnn', which needs a policy file Simic trained: "
              "tests/morph/test_gnn.py::test_a_run_with_controller_kind_gnn_decides_with_the_policy_file"},
    "screener": {"live.worker_restarts": "read only by the sharded runner's parent when a worker dies (live.workers "
                 "> 0, worker processes the mock REST endpoint cannot reach): tests/screener/test_shards.py::"
                 "test_a_killed_worker_is_restarted_and_no_rank_event_is_lost_or_repeated",
                 "live.shed_fraction": "read only while live mode sheds load: tests/screener/test_shards.py::"
                 "test_a_receive_backlog_sheds_the_least_active_symbols_depth_diffs"},
}


def shipped(system: str) -> list[Case]:
    names = sorted(p.stem for p in (CONFIGS / system).glob("*.toml"))
    # The tiny config runs first: the large ones are built over its mixture.
    names.sort(key=lambda n: n != "tiny")
    return [Case(system, n, large=n in LARGE.get(system, ())) for n in names]


# --- moe and nested: mixture preparation and the loop; large configs on the meta device -------------------------------

def _prep_overrides(case: Case, key: str, work: Path) -> list[str]:
    return [f"{key}.out_dir={work / f'{case.system}-{case.name}-{abs(hash(case.overrides))}'}"]


def run_moe(case: Case, work: Path) -> Run:
    from cambium.data.mixture import prepare_mixture
    from cambium.moe.config import MoEConfig
    from cambium.moe.train import MoETask, train

    tiny_mixture = work / "moe-tiny"
    if case.large:
        cfg = load(case.path, MoEConfig, [f"data.mixture.out_dir={tiny_mixture}", *case.overrides])
        with record_reads() as reads, torch.device("meta"):
            MoETask(cfg, META)
        return Run(cfg, reads, True)
    if case.prep_only:
        cfg = load(case.path, MoEConfig, [*_prep_overrides(case, "data.mixture", work), *case.overrides])
        with record_reads() as reads:
            prepare_mixture(cfg.data.mixture, cache_dir=work / "tiktoken")
        return Run(cfg, reads, False)
    # 512 tokens a step: warm-up, stable phase and decay of one step each (the third step ends at the floor).
    schedule = ["schedule.warmup=512", "schedule.stable=512", "schedule.decay=512"]
    cfg = load(case.path, MoEConfig, [f"data.mixture.out_dir={tiny_mixture}",
                                      "data.mixture.tokenizer.train_chars=100000", *schedule, *case.overrides])
    with record_reads() as reads:
        prepare_mixture(cfg.data.mixture)
        train(cfg, work / "runs", show_progress=False, measure_peak=False)
    return Run(cfg, reads, False)


def run_nested(case: Case, work: Path) -> Run:
    from cambium.data.mixture import prepare_mixture
    from cambium.nested.build import BuildTask, build
    from cambium.nested.config import NestedConfig

    tiny_mixture = work / "nested-tiny"
    if case.large:
        cfg = load(case.path, NestedConfig, [f"context.mixture.out_dir={tiny_mixture}", *case.overrides])
        with record_reads() as reads, torch.device("meta"):
            BuildTask(cfg, META)
        return Run(cfg, reads, True)
    if case.prep_only:
        cfg = load(case.path, NestedConfig, [*_prep_overrides(case, "context.mixture", work), *case.overrides])
        with record_reads() as reads:
            prepare_mixture(cfg.context.mixture, cache_dir=work / "tiktoken")
        return Run(cfg, reads, False)
    if case.overrides:  # a variant: one step on short streams over the tiny mixture
        cfg = load(case.path, NestedConfig, [f"context.mixture.out_dir={tiny_mixture}", "build.steps=1",
                                             "build.warmup_steps=0", "build.eval_chunks=1", "context.seq_len=16",
                                             "context.batch_size=2", *case.overrides])
        with record_reads() as reads:
            build(cfg, work / "runs", show_progress=False)
        return Run(cfg, reads, False)
    cfg = load(case.path, NestedConfig, [f"context.mixture.out_dir={tiny_mixture}",
                                         "context.mixture.tokenizer.train_chars=100000", "build.steps=3",
                                         "build.warmup_steps=1"])
    with record_reads() as reads:
        prepare_mixture(cfg.context.mixture)
        build(cfg, work / "runs", show_progress=False)
    return Run(cfg, reads, False)


# --- screener: replay, then the live path ---------------------------------------------------------------------------

CAPTURES = [SAMPLES / f"market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]


def _depth_snapshots() -> httpx.MockTransport:
    """The captures' own REST depth snapshots, answered like /fapi/v1/depth, and an exchangeInfo listing their two
    symbols (the default `live.symbols = "all"`)."""
    from cambium.market.captures import iter_hftbacktest
    from cambium.market.synthetic import exchange_info

    bodies = {}
    for path in CAPTURES:
        for rec in iter_hftbacktest(path):
            if rec.frame.startswith('{"lastUpdateId"'):
                bodies[path.name[:7].upper()] = rec.frame
                break

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/exchangeInfo"):
            return httpx.Response(200, json=exchange_info(sorted(bodies)), headers={"X-MBX-USED-WEIGHT-1M": "1"})
        return httpx.Response(200, text=bodies[request.url.params["symbol"]], headers={"X-MBX-USED-WEIGHT-1M": "20"})

    return httpx.MockTransport(answer)


def run_screener(case: Case, work: Path) -> Run:
    import cambium.screener.live
    from cambium.market.binance import route_usdm
    from cambium.market.binance_rest import RestClient
    from cambium.market.captures import iter_hftbacktest
    from cambium.market.config import WsConfig
    from cambium.market.replay_server import ReplayServer
    from cambium.screener.cli import run_with_status
    from cambium.screener.config import ScreenerConfig
    from cambium.screener.replay import replay
    from cambium.screener.storage import ScreenerStore

    if case.name.startswith("train") or any(o.startswith("train.") for o in case.overrides):
        from cambium.screener.train import train

        # a shorter run: fewer folds, trees and resamples (every field is still read)
        quick = ["train.cv_folds=2", "train.bootstrap=10", "train.lightgbm.n_estimators=10",
                 f"train.out_dir={work / f'artifacts-{case.name}-{len(case.overrides)}'}"]
        cfg = load(case.path, ScreenerConfig, [*case.overrides, *quick])
        with record_reads() as reads:
            train(cfg, work / "runs", name=case.name, show_progress=False)
        return Run(cfg, reads, False)
    cfg = load(case.path, ScreenerConfig, case.overrides)
    records = list(itertools.islice(heapq.merge(*(iter_hftbacktest(p) for p in CAPTURES), key=lambda r: r.recv_ns),
                                    5_000))
    transport = _depth_snapshots()

    async def live() -> None:
        async with ReplayServer(records, serves=lambda ep, s: route_usdm(s) == ep) as srv:
            ws = WsConfig(futures_public_url=srv.url("public"), futures_market_url=srv.url("market"))
            # default.toml subscribes to aggTrade and depth@100ms, which the captures do not hold: fewer events come.
            # registered as a live run (status.json every live.status_every_s), as `screener live` does
            await asyncio.to_thread(run_with_status, cfg, ws, max_events=1_000, duration_s=30, runs_dir=work / "runs")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cambium.screener.live, "RestClient", lambda market: RestClient(market, transport=transport))
        mp.setenv("CAMBIUM_TELEGRAM_TOKEN", "test-token")
        with record_reads() as reads:
            replay(CAPTURES, cfg, store=ScreenerStore(cfg.storage, work / f"store-{case.name}-{len(case.overrides)}"))
            asyncio.run(live())
    return Run(cfg, reads, False)


# --- market: import, download, record ------------------------------------------------------------------------------

def run_market(case: Case, work: Path) -> Run:
    from tests.market.fake_binance import FakeBinance, futures_rows, spot_rows

    from cambium.market.binance import binance_spot_venue, binance_usdm_venue, route_usdm
    from cambium.market.binance_rest import RestClient
    from cambium.market.captures import iter_hftbacktest
    from cambium.market.config import MarketConfig
    from cambium.market.connector import Connector
    from cambium.market.downloader import download_klines
    from cambium.market.importers import read_kline_file
    from cambium.market.recorder import Recorder
    from cambium.market.replay_server import ReplayServer
    from cambium.market.store import CandleStore

    rows = {"futures": futures_rows(SAMPLES / "market/klines_1h_futures/BTCUSDT.csv.gz")[:300],
            "spot": spot_rows(SAMPLES / "market/klines_1h_spot/BTCUSDT.csv.gz")[:300]}
    records = list(itertools.islice(iter_hftbacktest(CAPTURES[0]), 2_000))
    streams = ["btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@0ms"]
    root = work / f"market-{case.name}"

    async def record(cfg: MarketConfig) -> None:
        binance_spot_venue(cfg.ws)  # `market record --market spot` would take this one
        conn = Connector(binance_usdm_venue(cfg.ws), streams, cfg.ws)
        with Recorder(root / "recording", meta={"streams": streams}) as rec:
            async with conn:
                frames = 0
                async for frame, _ in conn.deliveries():
                    rec.write(frame)
                    frames += 1
                    if frames == 200:
                        return

    with FakeBinance({"BTCUSDT": rows["futures"]}, faults={1: ("5xx", 502)}) as fut, \
            FakeBinance({"BTCUSDT": rows["spot"]}) as spot:
        async def serve() -> Run:
            async with ReplayServer(records, serves=lambda ep, s: route_usdm(s) == ep) as srv:
                cfg = load(case.path, MarketConfig, [
                    f"store.root={root / 'store'}", f"rest.futures_url={fut.url}", f"rest.spot_url={spot.url}",
                    f"ws.futures_public_url={srv.url('public')}", f"ws.futures_market_url={srv.url('market')}",
                    *case.overrides])
                with record_reads() as reads:
                    got = read_kline_file(SAMPLES / "market/klines_1h_futures/ETHUSDT.csv.gz")
                    CandleStore(cfg.store.root, "futures").write(got.symbol, got.interval, got.table, merge=True)
                    for market in ("futures", "spot"):
                        store = CandleStore(cfg.store.root, market)
                        with RestClient(market, cfg.rest, sleep=lambda s: None,
                                        incident_log=Path(cfg.store.root) / "_incidents.jsonl") as client:
                            client.exchange_info()
                            first = rows[market][0][0]
                            download_klines(client, store, ["BTCUSDT"], "1h", first, until_ms=first + 99 * 3_600_000)
                    await asyncio.wait_for(record(cfg), 60)
                return Run(cfg, reads, False)

        return asyncio.run(serve())


# --- worldmodel and morph ---------------------------------------------------------------------------------------

def run_worldmodel(case: Case, work: Path) -> Run:
    from cambium.worldmodel.config import WorldModelConfig
    from cambium.worldmodel.jepa import WorldModelJEPA
    from cambium.worldmodel.pipeline import run_pipeline
    from cambium.worldmodel.tokenizer import FSQTokenizer

    if case.large:
        cfg = load(case.path, WorldModelConfig, case.overrides)
        with record_reads() as reads, torch.device("meta"):
            WorldModelJEPA(cfg.jepa, FSQTokenizer(cfg.tokenizer))
        return Run(cfg, reads, True)
    # All nine phases, each training phase two steps long (one of warm-up); the agents one rollout (PPO) and a few
    # steps past TD-MPC2's random seeding, backtested with few bootstrap resamples.
    cfg = load(case.path, WorldModelConfig, ["train_tokenizer.steps=2", "train_tokenizer.warmup_steps=1",
                                             "train_jepa.steps=2", "train_jepa.warmup_steps=1", "train_flow.steps=2",
                                             "train_flow.warmup_steps=1", "ppo.steps=64", "ppo.n_steps=64",
                                             "agents.tdmpc_steps=12", "tdmpc.seed_steps=8",
                                             "backtest.bootstrap_samples=10", *case.overrides])
    with record_reads() as reads:
        run_pipeline(cfg, work / "runs", show_progress=False)
    return Run(cfg, reads, False)


def run_morph(case: Case, work: Path) -> Run:
    from cambium.morph.compare import compare
    from cambium.morph.config import MorphConfig
    from cambium.morph.train import train

    # cifar10-cpu: one epoch on a few images (its 32 epochs of 24,000 images take most of an hour). tiny: 14 epochs
    # with every TRAINING seed let through, so that seeds graft, stabilise, are evaluated, fine-tuned and fossilize.
    longer = (["data.limit=256", "train.max_steps=1"] if case.large
              else ["train.max_steps=16"])
    cfg = load(case.path, MorphConfig, [f"library.root={work / 'urza'}", *longer, *case.overrides])
    with record_reads() as reads:
        train(cfg, name=case.name, runs_root=work / "runs", show_progress=False)
        if not case.large:
            compare(load(case.path, MorphConfig, [f"library.root={work / 'urza'}", "train.max_steps=1"]),
                    name=f"{case.name}-compare", runs_root=work / "compare")
    return Run(cfg, reads, case.large)


RUNNERS: dict[str, Callable[[Case, Path], Run]] = {
    "moe": run_moe, "nested": run_nested, "screener": run_screener, "market": run_market,
    "worldmodel": run_worldmodel, "morph": run_morph,
}


# --- the check --------------------------------------------------------------------------------------------------------

class SystemRuns:
    """Every case of a system, run once (lazily) and kept for the tests of its configs."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._runs: dict[str, dict[Case, Run]] = {}

    def of(self, system: str) -> dict[Case, Run]:
        if system not in self._runs:
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(REPO)  # the configs name the committed data by paths relative to the repository
                cases = [*shipped(system), *VARIANTS.get(system, [])]
                self._runs[system] = {c: RUNNERS[system](c, self.work) for c in cases}
        return self._runs[system]


def unread_fields(case: Case, runs: dict[Case, Run]) -> list[str]:
    """The dotted paths of `case`'s config that fail the rule of the module docstring, with why."""
    run = runs[case]
    anywhere = set().union(*(r.reads.fields_read_anywhere() for r in runs.values()))
    out = []
    for leaf in leaves(run.cfg):
        if leaf.is_tag or leaf.name in run.reads.fields_read(leaf.owner):
            continue
        if run.large and leaf.path.startswith(STEP_ONLY.get(case.system, ())) and leaf.field in anywhere:
            continue
        if not leaf.is_default:
            out.append(f"{leaf.path} = {leaf.value!r} (set, but its run never read it)")
        elif leaf.field not in anywhere and leaf.path not in ELSEWHERE.get(case.system, {}):
            out.append(f"{leaf.path} (no run of {case.system} reads it)")
    return out


@pytest.fixture(scope="module")
def system_runs(tmp_path_factory: pytest.TempPathFactory) -> SystemRuns:
    return SystemRuns(tmp_path_factory.mktemp("config-fields"))


def _cases() -> Iterator[Any]:
    for system_dir in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        for path in sorted(system_dir.glob("*.toml")):
            marks = [pytest.mark.skip(reason=SKIPPED[system_dir.name])] if system_dir.name in SKIPPED else []
            yield pytest.param(system_dir.name, path.stem, marks=marks, id=f"{system_dir.name}/{path.name}")


@pytest.mark.parametrize(("system", "name"), list(_cases()))
def test_every_field_of_a_shipped_config_is_read(system: str, name: str, system_runs: SystemRuns) -> None:
    runs = system_runs.of(system)
    case = next(c for c in runs if c.name == name and not c.overrides)
    unread = unread_fields(case, runs)
    assert not unread, f"configs/{system}/{name}.toml: fields nothing reads:\n  " + "\n  ".join(unread)


class _Inner(ConfigModel):
    used: int = 1
    unused: int = 2
    kind: Literal["inner"] = "inner"

    @model_validator(mode="after")
    def _check(self) -> _Inner:
        assert self.unused >= 0  # a validator's read is no use
        return self


class _Root(ConfigModel):
    inner: _Inner = _Inner()
    items: tuple[_Inner, ...] = ()


def test_reads_count_uses_and_the_rule_names_what_nothing_used() -> None:
    with record_reads() as reads:
        cfg = load_data({"inner": {"used": 5, "unused": 3}, "items": [{}, {"used": 7}]}, _Root)
        assert fingerprint(cfg) and to_toml(cfg) and cfg == cfg  # dumps and comparisons are no uses either
        sub = cfg.items  # a table of sub-models is used through what is read inside it
        assert cfg.inner.used + sub[1].used == 12
    assert {leaf.path for leaf in leaves(cfg) if leaf.name in reads.fields_read(leaf.owner)} == {
        "inner.used", "items[1].used"}
    case = Case("test", "root")
    # items[0].used is a default another instance's read covers; `kind` is a tag.
    assert unread_fields(case, {case: Run(cfg, reads, False)}) == [
        "inner.unused = 3 (set, but its run never read it)", "items[0].unused (no run of test reads it)",
        "items[1].unused (no run of test reads it)"]
