"""SCR-11: the committed captures replay to the committed digest; a scoring change changes it; bad frames count."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cambium.core.config import load
from cambium.screener.cli import app
from cambium.screener.config import ScreenerConfig
from cambium.screener.replay import replay
from cambium.screener.storage import read_features, read_rank_events

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "screener" / "sample-replay.toml"
EXPECTED = REPO / "configs" / "screener" / "sample-replay.expected.json"
CAPTURES = [REPO / f"data/samples/market/ws/binance_usdm_hftbacktest/{s}_20240808.gz" for s in ("btcusdt", "ethusdt")]


def test_committed_capture_replays_to_the_committed_digest() -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["replay", *map(str, CAPTURES), "--config", str(CONFIG), "--expected", str(EXPECTED)])
    assert first.exit_code == 0, first.output
    digest = json.loads(EXPECTED.read_text())["digest"]
    assert digest in first.output and len(digest) == 64
    again = replay(CAPTURES, load(CONFIG, ScreenerConfig))
    assert again.digest == digest and again.rank_events == json.loads(EXPECTED.read_text())["rank_events"] > 0


def test_a_changed_scoring_weight_changes_the_digest() -> None:
    result = CliRunner().invoke(app, ["replay", *map(str, CAPTURES), "--config", str(CONFIG), "--expected",
                                      str(EXPECTED), "--set", "scorer.w_2m=0.6", "--set", "scorer.w_5m=0.2"])
    assert result.exit_code == 1 and "digest differs" in result.output


def test_malformed_and_out_of_order_frames_are_counted_never_fatal(tmp_path: Path) -> None:
    with gzip.open(CAPTURES[0], "rt") as fh:
        lines = fh.read().splitlines()[:20_000]
    lines[100], lines[101] = lines[101], lines[100]  # out of order
    bad = ["1723161255088169167 {not json", "1723161255088169168 {\"stream\":\"btcusdt@trade\",\"data\":{\"e\":1}}",
           "no-stamp-at-all", "1723161255088169169 [1,2,3]"]
    mixed = lines[:500] + bad + lines[500:]
    path = tmp_path / "btcusdt_20240808.txt"
    path.write_text("\n".join(mixed) + "\n")
    result = replay([path], load(CONFIG, ScreenerConfig))
    assert result.stats.malformed == 3 and result.stats.skipped_lines == [503]
    assert result.stats.events == 20_000 and result.snapshots > 0


def test_the_demo_stores_its_replay_under_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`screener demo --runs-dir` receives the replay's Parquet rows and digest, replacing an earlier demo's store.

    The live half is stubbed out here; test_live.py runs it against the local replay server."""
    import cambium.screener.cli as cli

    monkeypatch.setattr(cli, "run_with_status", lambda *args, **kwargs: {"top": []})
    monkeypatch.chdir(REPO)
    out = tmp_path / "screener_demo"
    (out / "store" / "rank_events").mkdir(parents=True)
    (out / "store" / "rank_events" / "part-000000.parquet").write_text("left by an earlier demo")
    result = CliRunner().invoke(app, ["demo", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    want = json.loads(EXPECTED.read_text())
    got = json.loads((out / "replay.json").read_text())
    assert (got["digest"], got["rank_events"], got["snapshots"]) == (want["digest"], want["rank_events"],
                                                                    want["snapshots"])
    assert len(read_rank_events(out / "store")) == want["rank_events"]
    assert len(read_features(out / "store")) == want["snapshots"]
