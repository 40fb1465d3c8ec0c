from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cambium.core.config import load_data
from cambium.core.errors import ConfigError, DataError
from cambium.data.mixture import (
    MixtureLoader,
    MixtureSpec,
    eval_windows,
    load_tokenizer,
    mixture_probabilities,
    prepare_mixture,
)
from cambium.data.tokens import TokenizerInfo, TokenShards, write_shards

SHAKESPEARE = Path("data/samples/text/tinyshakespeare/input.txt")
WIKI = Path("data/samples/text/wikitext-2/wiki.valid.tokens")


def test_shards_round_trip_across_shard_boundaries(tmp_path: Path) -> None:
    info = TokenizerInfo("toy", "f" * 64, 70_000, 69_999)  # > 65536: stored as uint32
    docs = [list(range(i, i + 7)) for i in range(0, 60, 7)]
    manifest = write_shards(tmp_path / "s", docs, info, shard_tokens=10)
    stream = np.concatenate([np.append(d, 69_999) for d in docs])
    shards = TokenShards(tmp_path / "s", verify=True)
    assert manifest["dtype"] == "uint32" and len(shards) == stream.size and len(manifest["shards"]) == 8
    for start in (0, 3, 9, 10, 11, 45):
        assert np.array_equal(shards.read(start, 17), stream[start : start + 17])
    with pytest.raises(IndexError):
        shards.read(len(shards) - 2, 3)
    with pytest.raises(DataError, match="outside"):
        write_shards(tmp_path / "bad", [[70_000]], info)


def test_corrupted_or_missing_shards_are_named(tmp_path: Path) -> None:
    info = TokenizerInfo("toy", "f" * 64, 100, 99)
    write_shards(tmp_path / "s", [[1, 2, 3]] * 10, info, shard_tokens=16)
    shard = tmp_path / "s" / "shard_00001.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    TokenShards(tmp_path / "s")  # sizes still match: only a verified open reads the bytes
    with pytest.raises(DataError, match=r"shard_00001\.bin: sha256"):
        TokenShards(tmp_path / "s", verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="does not match"):
        TokenShards(tmp_path / "s")
    with pytest.raises(DataError, match="no manifest"):
        TokenShards(tmp_path)


def spec(tmp_path: Path, **over: object) -> MixtureSpec:
    data = {"out_dir": str(tmp_path / "mix"), "tokenizer": {"kind": "bpe", "vocab_size": 512, "train_chars": 200_000},
            "datasets": [{"name": "shakespeare", "path": str(SHAKESPEARE), "weight": 3.0},
                         {"name": "wiki", "path": str(WIKI), "format": "paragraphs", "weight": 1.0}],
            "temperature": 2.0, **over}
    return load_data(data, MixtureSpec)


def test_prepare_is_deterministic_and_splits_held_out_tail(tmp_path: Path) -> None:
    a = prepare_mixture(spec(tmp_path / "a"))
    b = prepare_mixture(spec(tmp_path / "b"))
    strip = [{k: v for k, v in d.items()} for d in a["datasets"]]
    assert strip == b["datasets"] and a["tokenizer"] == b["tokenizer"]
    probs = [d["probability"] for d in a["datasets"]]
    assert probs == pytest.approx([3 ** 0.5 / (3 ** 0.5 + 1), 1 / (3 ** 0.5 + 1)])
    tok = load_tokenizer(tmp_path / "a" / "mix")
    text = SHAKESPEARE.read_text()
    val = TokenShards(tmp_path / "a" / "mix" / "shakespeare" / "val")
    decoded = tok.decode(val.read(0, len(val) - 1).tolist())
    assert decoded == text[int(len(text) * 0.95):]  # the val split is exactly the held-out tail, losslessly


def test_bad_mixture_inputs_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare_mixture(spec(tmp_path, datasets=[{"name": "x", "path": str(tmp_path / "nope.txt")}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no string field 'text'"):
        prepare_mixture(spec(tmp_path, datasets=[{"name": "x", "path": str(bad), "format": "jsonl"}]))
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        prepare_mixture(spec(tmp_path, datasets=[{"name": "x", "path": str(bad), "format": "jsonl"}]))
    with pytest.raises(ConfigError, match="repeated"):
        spec(tmp_path, datasets=[{"name": "x", "path": "a"}, {"name": "x", "path": "b"}])
    with pytest.raises(DataError, match="no prepared mixture"):
        MixtureLoader(tmp_path, seq_len=8, batch_size=2, seed=0)


def test_loader_follows_the_probabilities_and_resumes_exactly(tmp_path: Path) -> None:
    prepare_mixture(spec(tmp_path))
    root = tmp_path / "mix"
    full = MixtureLoader(root, seq_len=32, batch_size=8, seed=7)
    batches = [full.next_batch() for _ in range(30)]
    assert batches[0].shape == (8, 33) and batches[0].dtype == torch.int64
    resumed = MixtureLoader(root, seq_len=32, batch_size=8, seed=7)
    for _ in range(12):
        resumed.next_batch()
    state = json.loads(json.dumps(resumed.state_dict()))  # the cursor survives JSON (it goes into checkpoints)
    fresh = MixtureLoader(root, seq_len=32, batch_size=8, seed=7)
    fresh.load_state_dict(state)
    for expected in batches[12:]:
        assert torch.equal(fresh.next_batch(), expected)
    # Rank r of 2 gets rows r::2 of the same global batch.
    r1 = MixtureLoader(root, seq_len=32, batch_size=8, seed=7, rank=1, world_size=2)
    assert torch.equal(r1.next_batch(), batches[0][1::2])
    big = MixtureLoader(root, seq_len=32, batch_size=64, seed=1)
    for _ in range(50):
        big.next_batch()
    counts = np.zeros(2)
    for i in range(2):
        state = big.state_dict()["datasets"][big.names[i]]
        counts[i] = state["epoch"] * big.n_windows[i] + state["position"]
    p = mixture_probabilities([3.0, 1.0], 2.0)
    assert counts / counts.sum() == pytest.approx(p, abs=0.03)


def test_epochs_visit_every_window_once(tmp_path: Path) -> None:
    prepare_mixture(spec(tmp_path, datasets=[{"name": "s", "path": str(SHAKESPEARE), "val_fraction": 0.1}]))
    root = tmp_path / "mix"
    loader = MixtureLoader(root, split="val", seq_len=256, batch_size=1, seed=3)
    n = loader.n_windows[0]
    seen = sorted(tuple(loader.next_batch()[0].tolist()) for _ in range(n))
    expected = sorted(tuple(w.tolist()) for w in eval_windows(root, "s", seq_len=256))
    assert seen == expected and len(expected) == n and loader.epoch == [1]


def small_spec(tmp_path: Path, source: Path) -> MixtureSpec:
    return spec(tmp_path, datasets=[{"name": "s", "path": str(source), "val_fraction": 0.1}])


def test_a_prepared_mixture_records_its_sources_and_a_changed_source_is_refused(tmp_path: Path) -> None:
    from cambium.core.files import file_sha256
    from cambium.data.mixture import ensure_mixture, mixture_staleness

    source = tmp_path / "corpus.txt"
    source.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    cfg = small_spec(tmp_path, source)
    mixture = prepare_mixture(cfg)
    assert mixture["datasets"][0]["sources"] == [
        {"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": file_sha256(source)}]
    assert mixture_staleness(cfg) is None
    root = tmp_path / "mix"
    MixtureLoader(root, seq_len=32, batch_size=4, seed=0)  # unchanged: accepted
    with source.open("a", encoding="utf-8") as fh:
        fh.write("\nA NEW SCENE, never tokenized.\n")
    with pytest.raises(DataError, match=r"corpus\.txt.*changed since the mixture was prepared.*prepare the mixture "
                       "again"):
        MixtureLoader(root, seq_len=32, batch_size=4, seed=0)
    with pytest.raises(DataError, match=r"prepared data is stale.*rebuild it with `cambium moe prep-mixture"):
        ensure_mixture(cfg, rebuild=False)
    ensure_mixture(cfg, rebuild=True)  # a new run rebuilds
    assert mixture_staleness(cfg) is None
    assert read_sources(root) == file_sha256(source)
    MixtureLoader(root, seq_len=32, batch_size=4, seed=0)
    other = small_spec(tmp_path, SHAKESPEARE)  # the config now names another file
    assert "another data.mixture spec" in (mixture_staleness(other) or "")


def read_sources(root: Path) -> str:
    return str(json.loads((root / "mixture.json").read_text())["datasets"][0]["sources"][0]["sha256"])


def test_a_tampered_loader_cursor_is_a_checkpoint_error_naming_the_key(tmp_path: Path) -> None:
    from cambium.core.errors import CheckpointError

    prepare_mixture(small_spec(tmp_path, SHAKESPEARE))
    loader = MixtureLoader(tmp_path / "mix", seq_len=32, batch_size=4, seed=0)
    good = json.loads(json.dumps(loader.state_dict()))
    for key, value, match in [("position", 10**9, r"datasets\.s: position=1000000000 must be .* < \d+"),
                              ("position", -1, r"datasets\.s: position=-1"),
                              ("epoch", "x", r"datasets\.s: epoch='x'"),
                              ("epoch", 2**70, r"datasets\.s: epoch=")]:
        bad = json.loads(json.dumps(good))
        bad["datasets"]["s"][key] = value
        with pytest.raises(CheckpointError, match=match):
            loader.load_state_dict(bad)
    with pytest.raises(CheckpointError, match="batches"):
        loader.load_state_dict({**good, "batches": -3})
    with pytest.raises(CheckpointError, match="datasets"):
        loader.load_state_dict({**good, "datasets": [1]})
    loader.load_state_dict(good)


def test_a_tampered_context_stream_cursor_is_a_checkpoint_error_naming_the_key(tmp_path: Path) -> None:
    from cambium.core.errors import CheckpointError
    from cambium.nested.stream import ContextStream

    prepare_mixture(small_spec(tmp_path, SHAKESPEARE))
    stream = ContextStream(tmp_path / "mix", seq_len=16, lanes=2)
    stream.advance()
    good = stream.state_dict()
    for change, match in [({"consumed": -5, "steps": 0}, r"consumed=-5"),
                          ({"steps": "1"}, r"steps='1'"),
                          ({"consumed": 10**30, "steps": 1}, r"consumed=1000000000000000000000000000000"),
                          ({"consumed": 17, "steps": 1}, r"consumed=17 must be steps \* seq_len")]:
        with pytest.raises(CheckpointError, match=match):
            stream.load_state_dict({**good, **change})
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        stream.load_state_dict([])  # type: ignore[arg-type]
    stream.load_state_dict(good)
    assert stream.steps == 1
