"""WM-7 probes and the phase-1 data path: closed forms against scikit-learn, split hygiene, targets, bad files, gaps."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from cambium.worldmodel.config import DataConfig, EvalConfig, JEPAConfig, TokenizerConfig
from cambium.worldmodel.data import chronological_split, import_candles, load_segments
from cambium.worldmodel.evaluation import CodedSeries, fit_logistic, fit_ridge, probe_dataset, r2_score, run_probes
from cambium.worldmodel.jepa import WorldModelJEPA
from cambium.worldmodel.tokenizer import FSQTokenizer

KLINES = Path(__file__).resolve().parents[2] / "data" / "samples" / "market" / "klines_1h_futures"


def _problem(seed: int = 0, n: int = 400, f: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * rng.uniform(0.5, 3, size=f)
    y = x @ rng.normal(size=f) + 0.7 + rng.normal(size=n)
    return x, y


@pytest.mark.parametrize("alpha", [0.01, 1.0, 100.0])
def test_ridge_matches_scikit_learn(alpha: float) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _problem()
    w, b = fit_ridge(x, y, alpha)
    ref = sklearn.Ridge(alpha=alpha).fit(x, y)
    np.testing.assert_allclose(w, ref.coef_, rtol=1e-9, atol=1e-10)
    assert b == pytest.approx(ref.intercept_, rel=1e-9)
    metrics = pytest.importorskip("sklearn.metrics")
    pred = x @ w + b
    assert r2_score(y, pred) == pytest.approx(metrics.r2_score(y, pred), rel=1e-12)


@pytest.mark.parametrize("l2", [0.1, 1.0, 10.0])
def test_logistic_matches_scikit_learn(l2: float) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _problem(1)
    label = y > np.median(y)
    w, b = fit_logistic(x, label, l2)
    ref = sklearn.LogisticRegression(C=1.0 / l2, tol=1e-12, max_iter=10_000).fit(x, label)
    np.testing.assert_allclose(w, ref.coef_[0], rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(ref.intercept_[0], rel=1e-5, abs=1e-6)


def _store(tmp_path: Path, symbols: list[str]) -> tuple[DataConfig, list]:
    cfg = DataConfig(klines_glob=str(KLINES / "*.csv.gz"), symbols=tuple(symbols))
    report = import_candles(cfg, tmp_path / "store")
    return cfg, load_segments(tmp_path / "store", cfg, sorted(report.symbols))


def test_probe_dataset_targets_splits_and_no_future_leak(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, segments = _store(tmp_path, ["BTCUSDT"])
    ev = EvalConfig(holdout_fraction=0.3, embargo_bars=40)
    split = chronological_split(segments, ev, "1h")
    tok_cfg = TokenizerConfig(patch_length=8, hidden_channels=8, n_layers=3)
    jcfg = JEPAConfig.model_validate({"seq_len": 4, "encoder": {"d_model": 8, "n_layers": 1, "n_heads": 2,
                                                                "chunk_size": 4}})
    model = WorldModelJEPA(jcfg, FSQTokenizer(tok_cfg)).eval()
    s = segments[0]
    codes = model.tokenizer.tokenize(s.ohlcv.float().unsqueeze(0))[0]
    offset = s.ohlcv.shape[0] % 8
    data = probe_dataset(model, [CodedSeries(s, codes, offset, 8)], split, ev)
    # Anchor k = 3 (first full window): its last bar is offset + 31, the target the next bar's log return.
    e = offset + 4 * 8 - 1
    assert data.y[0] == pytest.approx(float(np.log(float(s.ohlcv[e + 1, 3]) / float(s.ohlcv[e, 3]))), rel=1e-12)
    assert data.target_time[0] == int(s.open_time_ms[e + 1])
    assert not (data.train & data.holdout).any()
    assert (data.target_time[data.train] < split.split_ms).all()
    assert (data.target_time[data.holdout] - 3_600_000 >= split.holdout_ms).all()
    gap_h = (data.target_time[data.holdout].min() - data.target_time[data.train].max()) // 3_600_000
    assert gap_h >= ev.embargo_bars
    # Latents of training anchors do not change when every hold-out bar is replaced (causal encoder, grid codes).
    changed = s.ohlcv.clone()
    late = s.open_time_ms >= split.split_ms
    gen = torch.Generator().manual_seed(1)
    walk = 1e4 * torch.exp(torch.cumsum(torch.randn(int(late.sum()), generator=gen, dtype=torch.float64) * 0.03, 0))
    changed[late, 0] = torch.cat([walk[:1], walk[:-1]])
    changed[late, 3] = walk
    changed[late, 1] = changed[late, :4].max(dim=1).values * 1.01
    changed[late, 2] = changed[late, :4].min(dim=1).values * 0.99
    s2 = type(s)(s.name, changed, s.open_time_ms)
    codes2 = model.tokenizer.tokenize(changed.float().unsqueeze(0))[0]
    data2 = probe_dataset(model, [CodedSeries(s2, codes2, offset, 8)], split, ev)
    np.testing.assert_array_equal(data.latent[data.train], data2.latent[data2.train])
    np.testing.assert_array_equal(data.y[data.train], data2.y[data2.train])
    assert not np.array_equal(data.latent[data.holdout], data2.latent[data2.holdout])
    probes = run_probes(data, ev)
    assert [r["features"] for r in probes["results"]] == ["latent", "raw"]
    assert probes["results"][1]["dim"] == 8 * 5 + 6


def test_a_segment_shorter_than_one_window_gives_no_anchor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, segments = _store(tmp_path, ["BTCUSDT"])
    ev = EvalConfig(holdout_fraction=0.3, embargo_bars=40)
    split = chronological_split(segments, ev, "1h")
    jcfg = JEPAConfig.model_validate({"seq_len": 4, "encoder": {"d_model": 8, "n_layers": 1, "n_heads": 2,
                                                                "chunk_size": 4}})
    model = WorldModelJEPA(jcfg, FSQTokenizer(TokenizerConfig(patch_length=8, hidden_channels=8, n_layers=3))).eval()
    s = segments[0]
    short = type(s)("NEWUSDT", s.ohlcv[:20], s.open_time_ms[:20])  # a recent listing: 2 patches < seq_len 4

    def coded(x):
        return CodedSeries(x, model.tokenizer.tokenize(x.ohlcv.float().unsqueeze(0))[0], x.ohlcv.shape[0] % 8, 8)

    alone = probe_dataset(model, [coded(s)], split, ev)
    both = probe_dataset(model, [coded(short), coded(s)], split, ev)
    np.testing.assert_array_equal(both.y, alone.y)


def test_bad_files_are_counted_and_gaps_split_segments(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with gzip.open(KLINES / "BTCUSDT.csv.gz", "rt") as fh:
        lines = fh.read().splitlines()
    # ETHUSDT: drop 5 bars in the middle (a gap); XRPUSDT: high below low in row 3 (invalid, rejected).
    with gzip.open(KLINES / "ETHUSDT.csv.gz", "rt") as fh:
        eth = fh.read().splitlines()
    (src / "ETHUSDT.csv").write_text("\n".join(eth[:1001] + eth[1006:]) + "\n")
    bad = lines[:]
    f = bad[3].split(",")
    f[2], f[3] = f[3], str(float(f[2]) * 2)
    bad[3] = ",".join(f)
    (src / "XRPUSDT.csv").write_text("\n".join(bad) + "\n")
    (src / "BTCUSDT.csv").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(klines_glob=str(src / "*.csv"))
    report = import_candles(cfg, tmp_path / "store")
    assert sorted(report.symbols) == ["BTCUSDT", "ETHUSDT"]
    assert list(report.rejected) == [str(src / "XRPUSDT.csv")] and "high" in report.rejected[str(src / "XRPUSDT.csv")]
    assert report.symbols["ETHUSDT"]["gaps"] == 1 and report.symbols["ETHUSDT"]["missing_bars"] == 5
    assert report.symbols["BTCUSDT"]["rows"] == len(lines) - 2  # header and the still-forming last bar
    segments = load_segments(tmp_path / "store", cfg, sorted(report.symbols))
    assert [s.name for s in segments] == ["BTCUSDT", "ETHUSDT.0", "ETHUSDT.1"]
    assert [s.ohlcv.shape[0] for s in segments[1:]] == [1000, len(eth) - 1006 - 1]
    for s in segments:
        assert (torch.diff(s.open_time_ms) == 3_600_000).all()


def test_a_configured_store_is_read_as_it_is(tmp_path: Path) -> None:
    store = tmp_path / "shared_store"
    import_candles(DataConfig(klines_glob=str(KLINES / "*.csv.gz"), symbols=("ADAUSDT", "BTCUSDT")), store)
    cfg = DataConfig(klines_glob="", store_dir=str(store), symbols=("BTCUSDT",))
    report = import_candles(cfg, store, merge=True)
    assert list(report.symbols) == ["BTCUSDT"] and report.symbols["BTCUSDT"]["rows"] == 4499
    assert sorted(import_candles(DataConfig(klines_glob="", store_dir=str(store)), store).symbols) == [
        "ADAUSDT", "BTCUSDT"]
    with pytest.raises(ValueError, match="klines_glob is empty and store_dir is not set"):
        DataConfig(klines_glob="")
