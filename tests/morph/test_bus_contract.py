"""MOR-7: the bus contract suite (tests/morph/bus_contract.py) on the in-process bus, plus a fuzz of raw frames."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.morph.bus_contract import *  # noqa: F403  (the contract's tests run here against this module's fixture)

from cambium.morph.bus import TOPICS, InProcessBus


@pytest.fixture
def bus() -> Iterator[InProcessBus]:
    b = InProcessBus()
    yield b
    b.close()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(TOPICS)), st.one_of(st.text(max_size=200), st.binary(max_size=200),
                                                  st.dictionaries(st.text(max_size=10), st.integers(), max_size=4)))
def test_raw_frames_never_raise(topic: str, frame: str | bytes | dict[str, int]) -> None:
    bus = InProcessBus()
    env = bus.publish_raw(topic, frame)
    assert (env is None) == (bus.rejected == 1)
    assert len(bus.log(topic)) == (0 if env is None else 1)
