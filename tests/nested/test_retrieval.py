"""Retrieval probes: deterministic from the seed, the needles and targets where the layout says, accuracy in [0, 1]
from `evaluate_run`, and the --distances option refuses bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cambium.core.errors import ConfigError
from cambium.nested.build import build, evaluate_run
from cambium.nested.cli import parse_distances
from cambium.nested.retrieval import NEEDLE, PAIRS, default_distances, make_probe

from .conftest import tiny_config


def test_passkey_probe_hides_the_needle_and_asks_for_its_tail(tiny_mixture: Path) -> None:
    probe = make_probe("passkey", tiny_mixture, 20, samples=5, lead=7, seed=3)
    assert probe.tokens.shape == (5, 7 + NEEDLE + 20 + NEEDLE - 1)
    needle = probe.tokens[:, 7:7 + NEEDLE]
    assert torch.equal(probe.targets, needle[:, 3:])
    assert torch.equal(probe.tokens[:, -(NEEDLE - 1):], needle[:, :NEEDLE - 1])  # the cue repeats the needle
    assert (probe.positions[:, 0] == 7 + NEEDLE + 20 + 2).all()  # scored from the third cue token on
    again = make_probe("passkey", tiny_mixture, 20, samples=5, lead=7, seed=3)
    assert torch.equal(again.tokens, probe.tokens)
    assert not torch.equal(make_probe("passkey", tiny_mixture, 20, samples=5, lead=7, seed=4).tokens, probe.tokens)


def test_mqar_probe_asks_every_key_for_its_value(tiny_mixture: Path) -> None:
    probe = make_probe("mqar", tiny_mixture, 9, samples=4, lead=5, seed=0)
    keys, values = probe.tokens[:, 5:5 + 2 * PAIRS:2], probe.tokens[:, 6:6 + 2 * PAIRS:2]
    asked = probe.tokens.gather(1, probe.positions)
    assert (probe.positions[:, 0] == 5 + 2 * PAIRS + 9).all()
    for s in range(4):
        pairs = dict(zip(keys[s].tolist(), values[s].tolist(), strict=True))
        assert len(pairs) == PAIRS and sorted(asked[s].tolist()) == sorted(pairs)
        assert [pairs[k] for k in asked[s].tolist()] == probe.targets[s].tolist()
        assert torch.equal(probe.tokens[s].gather(0, probe.positions[s] + 1), probe.targets[s])


def test_eval_reports_accuracy_by_distance(tiny_mixture: Path, tmp_path: Path) -> None:
    result = build(tiny_config(tiny_mixture, "build.steps=2", "build.warmup_steps=1", "build.eval_chunks=1"),
                   tmp_path / "runs", show_progress=False)
    values = evaluate_run(tmp_path / "runs", result.run_id, max_chunks=2, retrieval=True, distances=(4, 80),
                          samples=4)
    keys = {k for k in values if k.startswith("retrieval/")}
    assert keys == {f"retrieval/{k}/d{d}" for k in ("passkey", "mqar") for d in (4, 80)}
    assert all(0.0 <= values[k] <= 1.0 for k in keys)
    assert default_distances(64) == (8, 32, 64, 128, 256)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=30))
def test_distances_option_parses_or_refuses_in_one_line(text: str) -> None:
    try:
        values = parse_distances(text)
    except ConfigError as exc:
        assert "--distances" in str(exc) and "\n" not in str(exc)
        return
    assert values and all(1 <= v <= 1_000_000 for v in values)


@pytest.mark.parametrize(("distance", "samples", "lead"), [(0, 8, 4), (8, 0, 4), (8, 8, -1)])
def test_a_probe_with_impossible_sizes_is_refused(tiny_mixture: Path, distance: int, samples: int, lead: int) -> None:
    with pytest.raises(ConfigError, match="probe needs"):
        make_probe("mqar", tiny_mixture, distance, samples=samples, lead=lead)
