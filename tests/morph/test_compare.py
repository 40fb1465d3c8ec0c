"""MOR-11 comparison: three registered arms, a larger static host sized from the morph run, a report from their data."""

from __future__ import annotations

import json
import math

import pytest

from cambium.core.config import load
from cambium.core.errors import ConfigError
from cambium.core.runs import list_runs
from cambium.morph.compare import seed_segments
from cambium.morph.config import CONFIG_MODEL
from cambium.morph.hosts import HostCNN, host_cnn_params, widths_for_params


@pytest.mark.parametrize("widths", [(3,), (4, 8, 8), (8, 16, 16), (5, 7, 11, 13)])
def test_host_cnn_params_matches_the_module(widths):
    assert host_cnn_params(widths, 10) == sum(p.numel() for p in HostCNN(widths, 10).parameters())


def test_widths_for_params_is_the_smallest_widening_that_reaches_the_target():
    base = (8, 16, 16)
    assert widths_for_params(base, 10, host_cnn_params(base)) == (base, 1.0)
    wide, mult = widths_for_params(base, 10, 4818)
    assert host_cnn_params(wide) >= 4818 and mult > 1.0
    # Smallest: the previous multiplier does not reach the target.
    previous = tuple(math.ceil(w * (mult - 0.05) - 1e-9) for w in base)
    assert host_cnn_params(previous) < 4818


def test_widths_for_params_raises_config_error_when_out_of_reach():
    with pytest.raises(ConfigError, match="param_ratio"):
        widths_for_params((2,), 10, 10**9, max_mult=4.0)


def test_seed_segments_spans_states_between_boundaries():
    timeline = [
        {"epoch": 1, "target": "GERMINATED"}, {"epoch": 2, "target": "LOADING"}, {"epoch": 2, "target": "TRAINING"},
        {"epoch": 3, "target": "CULLED"}, {"epoch": 5, "target": "DORMANT"},
    ]
    assert seed_segments(timeline, 6) == [
        ("DORMANT", 0, 1), ("GERMINATED", 1, 2), ("TRAINING", 2, 3), ("CULLED", 3, 5), ("DORMANT", 5, 6),
    ]
    assert seed_segments([], 4) == [("DORMANT", 0, 4)]


def _table_rows(md: str, header: str) -> list[list[str]]:
    """The cells of the Markdown table whose header row starts with `header`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _compare(tmp_path, *extra, reuse=False):
    from typer.testing import CliRunner

    from cambium.morph.cli import app

    runs = tmp_path / "runs"
    args = ["compare", "--config", "configs/morph/tiny.toml", "--runs-dir", str(runs), "--set", "train.epochs=2",
            "--set", "data.limit=128", "--set", f"library.root={tmp_path}/urza", *(["--reuse"] if reuse else [])]
    for item in extra:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return runs, result.output


def test_compare_cli_writes_report_of_three_registered_arms(tmp_path):
    runs, output = _compare(tmp_path)
    records = {r.name: r for r in list_runs(runs, "morph")}
    assert set(records) == {"tiny", "tiny-static", "tiny-static-large"}
    assert all(r.status == "finished" for r in records.values())
    reports = {name: json.loads((r.dir / "report.json").read_text()) for name, r in records.items()}
    configs = {name: load(r.dir / "config.toml", CONFIG_MODEL) for name, r in records.items()}
    morph, static, large = reports["tiny"], reports["tiny-static"], reports["tiny-static-large"]
    assert morph["morphogenetic"] and not static["morphogenetic"] and not large["morphogenetic"]
    # Same data, epochs, optimizer and seed; only the host widths and morphogenesis differ.
    for name in ("tiny-static", "tiny-static-large"):
        for section in ("data", "train"):
            a = getattr(configs["tiny"], section).model_dump()
            b = getattr(configs[name], section).model_dump()
            a.pop("morphogenetic", None), b.pop("morphogenetic", None)
            assert a == b, (name, section)
    assert configs["tiny-static"].model.widths == configs["tiny"].model.widths
    assert large["params"] >= morph["params"] and large["params"] > morph["host_params"]
    assert large["params"] == host_cnn_params(configs["tiny-static-large"].model.widths)

    out = records["tiny"].dir / "compare"
    assert f"report: {out / 'report.md'}" in output.replace("\n", "")
    for png in ("accuracy.png", "seeds.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "](accuracy.png)" in md and "](seeds.png)" in md
    every_run = {row[0]: row for row in _table_rows(md, "arm | train seed")}
    for label, name in (("morph", "tiny"), ("static", "tiny-static"), ("static-large", "tiny-static-large")):
        cells, rep = every_run[label], reports[name]
        assert cells[1:3] == ["0", f"`{rep['run_id']}`"]
        assert cells[4:7] == [f"{rep['val_acc']:.4f}", f"{rep['test_acc']:.4f}", str(rep["params"])], label
    summary = json.loads((out / "compare.json").read_text())
    for arm, name in zip(summary["runs"], ("tiny", "tiny-static", "tiny-static-large"), strict=True):
        for key in ("val_acc", "test_acc", "params", "run_id"):
            assert arm[key] == reports[name][key], (name, key)
        assert len(arm["val_acc_per_epoch"]) == 2
    # One seed: the paired difference is the plain difference, with no spread.
    paired = summary["summary"]["paired"]["morph - static-large"]
    assert paired["val_acc"]["mean"] == pytest.approx(morph["val_acc"] - large["val_acc"])
    assert paired["val_acc"]["sd"] == 0.0 and paired["seeds"] == 1
    for loc, seed in morph["seeds"].items():
        assert f"`{loc}` (final {seed['state']})" in md
        assert [tuple(s) for s in summary["seed_segments"]["0"][loc]] == seed_segments(seed["timeline"], 2)


def test_compare_over_train_seeds_pairs_runs_by_seed_and_sizes_one_large_host(tmp_path):
    runs, output = _compare(tmp_path, "compare.train_seeds=[3, 5]", "train.lr_schedule=cosine", "train.lr_floor=0.1",
                            'compare.variants={gm=["policy.blueprint_choice=gradmax", '
                            '"library.mutants_per_blueprint=1"]}')
    records = list_runs(runs, "morph")
    assert len(records) == 8
    gm = [r for r in records if r.name == "tiny-gm"]
    assert len(gm) == 2 and all(load(r.dir / "config.toml", CONFIG_MODEL).policy.blueprint_choice == "gradmax"
                                for r in gm)
    gm_params = max(json.loads((r.dir / "report.json").read_text())["params"] for r in gm)
    records = [r for r in records if r.name != "tiny-gm"]
    reports = [json.loads((r.dir / "report.json").read_text()) for r in records]
    configs = [load(r.dir / "config.toml", CONFIG_MODEL) for r in records]
    by_arm: dict[str, dict[int, dict]] = {}
    for rec, rep, cfg in zip(records, reports, configs, strict=True):
        by_arm.setdefault(rec.name, {})[cfg.train.seed] = {"report": rep, "widths": cfg.model.widths}
    assert {name: sorted(v) for name, v in by_arm.items()} == {
        "tiny": [3, 5], "tiny-static": [3, 5], "tiny-static-large": [3, 5]}
    # One larger host for every seed, at least as large as the largest morph run.
    (wide,) = {v["widths"] for v in by_arm["tiny-static-large"].values()}
    biggest = max(v["report"]["params"] for v in by_arm["tiny"].values())
    assert host_cnn_params(wide) >= max(biggest, gm_params)  # every grown arm counts in sizing it
    morph_dir = next(r.dir for r in records if r.name == "tiny" and load(r.dir / "config.toml", CONFIG_MODEL
                                                                          ).train.seed == 3)
    data = json.loads((morph_dir / "compare" / "compare.json").read_text())
    summary = data["summary"]
    vals = [by_arm["tiny"][s]["report"]["val_acc"] for s in (3, 5)]
    assert summary["arms"]["morph"]["val_acc"]["mean"] == pytest.approx(sum(vals) / 2)
    assert summary["arms"]["morph"]["val_acc"]["sd"] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    diffs = [by_arm["tiny"][s]["report"]["test_acc"] - by_arm["tiny-static"][s]["report"]["test_acc"]
             for s in (3, 5)]
    paired = summary["paired"]["morph - static"]["test_acc"]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2)
    assert paired["morph_at_least_as_good"] == sum(d >= 0 for d in diffs)
    lo, hi = paired["ci95"]  # mean ± t(0.975, 1) · sd / √2
    assert (lo + hi) / 2 == pytest.approx(paired["mean"])
    assert (hi - lo) / 2 == pytest.approx(12.706204736 * paired["sd"] / math.sqrt(2), rel=1e-6)
    assert set(summary["paired"]) == {"morph - static", "morph - static-large", "morph-gm - static",
                                      "morph-gm - static-large"}
    assert summary["arms"]["morph-gm"]["runs"] == 2
    assert set(data["seed_segments"]) == {"3", "5"}
    md = (morph_dir / "compare" / "report.md").read_text()
    assert "Train seed 5" in md and "morph - static-large" in output
    lr = configs[0].train.lr
    assert f"host lr {lr:g} on a cosine to {lr * 0.1:g}" in md
    # --reuse reads every finished arm back (same name, equal config): nothing is trained again, same summary
    _, again = _compare(tmp_path, "compare.train_seeds=[3, 5]", "train.lr_schedule=cosine", "train.lr_floor=0.1",
                        'compare.variants={gm=["policy.blueprint_choice=gradmax", '
                        '"library.mutants_per_blueprint=1"]}', reuse=True)
    assert len(list_runs(runs, "morph")) == 8 and again.count("(run ") == 8
    assert json.loads((morph_dir / "compare" / "compare.json").read_text())["summary"] == summary
    assert all(c.train.lr_schedule == "cosine" for c in configs)  # every arm on the same schedule


def test_duplicate_train_seeds_are_a_config_error():
    with pytest.raises(ConfigError, match="train_seeds"):
        load("configs/morph/tiny.toml", CONFIG_MODEL, ["compare.train_seeds=[1, 1]"])
