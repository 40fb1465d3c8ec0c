"""Golden per-step losses of every system's tiny config, compared bit for bit (torchtitan's habit).

A change that moves a trainer's numbers, even by one ulp, fails here. When the move is intended (a new default, a
fixed bug), regenerate the files and commit them with the change that moved them:

    .venv/bin/python tests/test_golden.py --write            # every system
    .venv/bin/python tests/test_golden.py --write moe nested # some

Each file lists `step name value` (value as a float hex, exact) for the losses of the tiny config run at one thread
in one process. Bitwise equality holds on one machine type; another CPU (other BLAS kernels) may differ in the last
bits, which is why the files record the machine they were made on.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
Rows = list[tuple[int, str, float]]


def _rows(metrics: Path, names: tuple[str, ...]) -> Rows:
    from cambium.core.metrics import read_metrics

    return [(r.step, r.name, r.value) for r in read_metrics(metrics) if r.name in names]


def _moe(tmp: Path) -> Rows:
    from cambium.core.config import load
    from cambium.data.mixture import prepare_mixture
    from cambium.moe.config import MoEConfig
    from cambium.moe.train import train

    cfg = load(REPO / "configs/moe/tiny.toml", MoEConfig, [f"data.mixture.out_dir={tmp / 'mixture'}",
                                                           "train.threads=1", *_datasets("data.mixture", 2)])
    prepare_mixture(cfg.data.mixture)
    result = train(cfg, tmp / "runs", show_progress=False, measure_peak=False)
    return _rows(result.run_dir / "metrics.duckdb", ("loss",))


def _nested(tmp: Path) -> Rows:
    from cambium.core.config import load
    from cambium.data.mixture import prepare_mixture
    from cambium.nested.build import build
    from cambium.nested.config import NestedConfig

    cfg = load(REPO / "configs/nested/tiny.toml", NestedConfig, [f"context.mixture.out_dir={tmp / 'mixture'}",
                                                                 "build.threads=1",
                                                                 *_datasets("context.mixture", 1)])
    prepare_mixture(cfg.context.mixture)
    result = build(cfg, tmp / "runs", show_progress=False)
    return _rows(result.run_dir / "metrics.duckdb", ("loss",))


def _worldmodel(tmp: Path) -> Rows:
    from cambium.core.config import load
    from cambium.worldmodel.config import CONFIG_MODEL
    from cambium.worldmodel.pipeline import run_pipeline

    cfg = load(REPO / "configs/worldmodel/tiny.toml", CONFIG_MODEL, [
        f"data.klines_glob={REPO}/data/samples/market/klines_1h_futures/*.csv.gz", "pipeline.threads=1"])
    result = run_pipeline(cfg, tmp / "runs", stop_phase=5, show_progress=False)
    return _rows(result.run_dir / "metrics.duckdb", ("tokenizer/loss", "jepa/loss", "flow/loss"))


def _morph(tmp: Path) -> Rows:
    from cambium.core.config import load
    from cambium.morph.config import CONFIG_MODEL as MORPH
    from cambium.morph.train import train

    cfg = load(REPO / "configs/morph/tiny.toml", MORPH, [f"library.root={tmp / 'urza'}", "train.threads=1",
                                                       f"data.root={REPO}/data/samples/images/cifar10/cifar-10-batches-py"])
    report = train(cfg, name="golden", runs_root=tmp / "runs", show_progress=False)
    return _rows(tmp / "runs" / report["run_id"] / "metrics.duckdb", ("train_loss", "val_acc"))


def _datasets(prefix: str, n: int) -> list[str]:
    """Absolute paths for the config's committed data sets, so the run does not depend on the working directory."""
    import tomllib

    system = "moe" if prefix.startswith("data") else "nested"
    raw = tomllib.loads((REPO / f"configs/{system}/tiny.toml").read_text())
    table = raw["data" if system == "moe" else "context"]["mixture"]["datasets"]
    assert len(table) == n
    return [f"{prefix}.datasets=[" + ", ".join(
        "{" + ", ".join(f"{k} = {_toml(REPO / v if k == 'path' else v)}" for k, v in d.items()) + "}"
        for d in table) + "]"]


def _toml(value: object) -> str:
    return f'"{value}"' if isinstance(value, str | Path) else repr(value).lower() if isinstance(value, bool) \
        else repr(value)


SYSTEMS: dict[str, Callable[[Path], Rows]] = {"moe": _moe, "morph": _morph, "nested": _nested,
                                              "worldmodel": _worldmodel}


def _path(system: str) -> Path:
    return GOLDEN / f"{system}-tiny.txt"


def _format(system: str, rows: Rows) -> str:
    head = [f"# golden losses of configs/{system}/tiny.toml at one thread ({platform.machine()}, "
            f"{platform.python_implementation()} {platform.python_version()}); regenerate with",
            f"#   .venv/bin/python tests/test_golden.py --write {system}"]
    return "\n".join([*head, *(f"{s} {n} {v.hex()}" for s, n, v in rows)]) + "\n"


def _parse(text: str) -> Rows:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            step, name, value = line.split()
            out.append((int(step), name, float.fromhex(value)))
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_tiny_losses_equal_the_golden_file_bit_for_bit(system: str, tmp_path: Path) -> None:
    expected = _parse(_path(system).read_text())
    actual = SYSTEMS[system](tmp_path)
    assert len(actual) == len(expected) > 0
    for (es, en, ev), (s, n, v) in zip(expected, actual, strict=True):
        assert (s, n) == (es, en)
        assert v.hex() == ev.hex(), (f"{system}: step {s} {n} = {v!r}, golden {ev!r}; if the change is meant to move "
                                     f"the numbers, run `.venv/bin/python tests/test_golden.py --write {system}`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the golden loss files.")
    parser.add_argument("--write", action="store_true", required=True, help="run the tiny configs and write")
    parser.add_argument("systems", nargs="*", choices=[[], *SYSTEMS], default=[], help="systems (default: all)")
    args = parser.parse_args(argv)
    for system in args.systems or sorted(SYSTEMS):
        with tempfile.TemporaryDirectory() as tmp:
            rows = SYSTEMS[system](Path(tmp))
        _path(system).write_text(_format(system, rows))
        print(f"{_path(system).relative_to(REPO)}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
