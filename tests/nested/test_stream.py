"""ContextStream: lanes read the concatenated split contiguously, wrap without epochs, report typed boundary events
exactly where a plain modular-index reference puts them, and resume from the cursor to the same chunks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cambium.core.errors import DataError
from cambium.data.mixture import DatasetSpec, MixtureSpec, TokenizerSpec, prepare_mixture
from cambium.data.tokens import TokenShards
from cambium.nested.stream import BoundaryEvent, ContextStream


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small datasets of several documents each (paragraphs), so the stream crosses datasets and documents."""
    tmp = tmp_path_factory.mktemp("stream")
    specs = []
    for name, words in (("a", "alpha beta gamma delta"), ("b", "one two three four five")):
        path = tmp / f"{name}.txt"
        docs = [" ".join(f"{w}{i}" for w in words.split() for i in range(d % 4 + 1)) for d in range(12)]
        path.write_text("\n\n".join(docs) + "\n")
        specs.append(DatasetSpec(name=name, path=path, format="paragraphs", val_fraction=0.2))
    out = tmp / "mixture"
    prepare_mixture(MixtureSpec(out_dir=out, tokenizer=TokenizerSpec(vocab_size=300), datasets=tuple(specs)))
    return out


def reference_stream(root: Path, split: str) -> np.ndarray:
    return np.concatenate([(s := TokenShards(root / n / split)).read(0, len(s)) for n in ("a", "b")])


def reference_events(flat: np.ndarray, eot: int, lanes: int, seq_len: int, consumed: int) -> list[BoundaryEvent]:
    n = flat.size
    events = []
    for b in range(lanes):
        for t in range(seq_len):
            pos = b * n // lanes + consumed + t
            if flat[pos % n] == eot:
                events.append(BoundaryEvent("document_end", b, t))
            if pos % n == 0 and consumed + t > 0:
                events.append(BoundaryEvent("wrap", b, t))
    return sorted(events, key=lambda e: (e.lane, e.offset, e.kind))


def test_lanes_match_a_modular_index_reference_across_wraps(two_corpora: Path) -> None:
    seq_len, lanes = 7, 3
    stream = ContextStream(two_corpora, split="train", seq_len=seq_len, lanes=lanes)
    flat = reference_stream(two_corpora, "train")
    assert stream.n_tokens == flat.size
    n = flat.size
    steps = 2 * n // seq_len + 3  # every lane wraps at least once
    kinds = set()
    for step in range(steps):
        chunk = stream.observe()
        assert chunk.step == step and chunk.tokens.shape == (lanes, seq_len + 1)
        assert stream.observe().tokens.equal(chunk.tokens)  # observing does not move the stream
        consumed = step * seq_len
        expected = np.stack([flat[(b * n // lanes + consumed + np.arange(seq_len + 1)) % n] for b in range(lanes)])
        np.testing.assert_array_equal(chunk.tokens.numpy(), expected)
        assert list(chunk.events) == reference_events(flat, stream.eot_id, lanes, seq_len, consumed)
        kinds |= {e.kind for e in chunk.events}
        stream.advance()
    assert kinds == {"document_end", "wrap"}


def test_cursor_resumes_to_the_same_chunks_and_rejects_another_stream(two_corpora: Path) -> None:
    stream = ContextStream(two_corpora, split="train", seq_len=5, lanes=2)
    for _ in range(11):
        stream.advance()
    state = stream.state_dict()
    again = ContextStream(two_corpora, split="train", seq_len=5, lanes=2)
    again.load_state_dict(state)
    for _ in range(30):
        assert again.observe().tokens.equal(stream.observe().tokens)
        assert again.observe().events == stream.observe().events
        again.advance()
        stream.advance()
    other = ContextStream(two_corpora, split="train", seq_len=6, lanes=2)
    with pytest.raises(DataError, match="seq_len"):
        other.load_state_dict(state)


def test_too_short_a_split_is_a_data_error(two_corpora: Path) -> None:
    n = ContextStream(two_corpora, split="val", seq_len=1, lanes=1).n_tokens
    with pytest.raises(DataError, match="too few"):
        ContextStream(two_corpora, split="val", seq_len=n, lanes=1)
