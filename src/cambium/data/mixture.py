"""Data mixtures: tokenize several corpora into shard sets, then sample training windows from them by weight.

Sampling rule. Dataset i is drawn with probability p_i = w_i^(1/T) / Σ_j w_j^(1/T) (weights w, temperature T: T = 1
follows the weights, T > 1 flattens towards uniform). Each dataset is cut into windows of `seq_len + 1` tokens with
stride `seq_len`; every epoch of a dataset visits all its windows once in an order drawn from (seed, dataset, epoch).

Exact resume. Every random choice is a pure function of (seed, batch index) or (seed, dataset, epoch), so the cursor
is small: the number of batches drawn and, per dataset, its epoch and position. `state_dict()` goes into the
checkpoint; `load_state_dict()` continues with exactly the batches an uninterrupted run would have drawn.

Provenance. mixture.json records the fingerprint of the spec it was prepared from and, per dataset, the path, size
and sha256 of every source file (`sources`). `mixture_staleness(spec)` says why a prepared mixture no longer matches
its spec or sources, `ensure_mixture` rebuilds it or refuses in one line, and the loaders refuse a mixture whose
recorded source files changed on disk: shards are never reused for data they were not made from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from cambium.core.checkpoint import cursor_int
from cambium.core.config import ConfigModel, fingerprint
from cambium.core.errors import CheckpointError, DataError
from cambium.core.files import file_sha256
from cambium.data.text import TextFormat, read_documents
from cambium.data.tokenizer import Tokenizer, load_bpe, tiktoken_from_file, train_bpe
from cambium.data.tokens import TokenizerInfo, TokenShards, write_shards

MIXTURE_FORMAT = "cambium-mixture/1"


class DatasetSpec(ConfigModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Short name; also the sub-directory of its shards.")
    path: Path = Field(description="File (text, paragraphs, jsonl; .gz allowed) or directory (hf) to read.")
    format: TextFormat = Field("text", description="How documents are read: text, paragraphs, jsonl or hf.")
    text_field: str = Field("text", description="Field holding the text (jsonl and hf).")
    weight: float = Field(1.0, gt=0, description="Mixture weight before temperature.")
    val_fraction: float = Field(0.05, ge=0, lt=0.5, description="Share held out for validation (tail of the corpus).")


class TokenizerSpec(ConfigModel):
    kind: Literal["bpe", "tiktoken"] = Field("bpe", description="bpe: train a byte-level BPE on the corpus; "
                                             "tiktoken: o200k_base/o200k_harmony from the local ranks file.")
    name: Literal["o200k_base", "o200k_harmony"] = Field("o200k_harmony", description="tiktoken encoding.")
    ranks_file: Path = Field(Path("data/samples/tokenizers/o200k_base.tiktoken"), description="o200k ranks file.")
    vocab_size: int = Field(4096, ge=260, le=65536, description="BPE vocabulary size.")
    train_chars: int = Field(4_000_000, gt=0, description="BPE is trained on at most this many characters.")


class MixtureSpec(ConfigModel):
    out_dir: Path = Field(Path("runs/data/mixture"), description="Where shards, tokenizer and mixture.json go.")
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec, description="Tokenizer.")
    datasets: tuple[DatasetSpec, ...] = Field(min_length=1, description="The corpora of the mixture.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature T in p_i ∝ w_i^(1/T).")
    shard_tokens: int = Field(1 << 22, gt=0, description="Tokens per shard file.")

    @model_validator(mode="after")
    def _unique_names(self) -> MixtureSpec:
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique; repeated: {dupes}")
        return self


def mixture_probabilities(weights: Sequence[float], temperature: float) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64) ** (1.0 / temperature)
    return w / w.sum()


def _split(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the tail: the last documents, or the tail of the only document."""
    if val_fraction == 0 or not docs:
        return docs, []
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    n_val = max(1, round(len(docs) * val_fraction))
    return docs[:-n_val], docs[-n_val:]


def _tokenizer(spec: MixtureSpec, train_texts: list[str], cache_dir: Path) -> Tokenizer:
    if spec.tokenizer.kind == "tiktoken":
        return tiktoken_from_file(spec.tokenizer.name, spec.tokenizer.ranks_file, cache_dir)
    budget, sample = spec.tokenizer.train_chars, []
    for text in train_texts:
        sample.append(text[:budget])
        budget -= len(sample[-1])
        if budget <= 0:
            break
    # Chunks keep the trainer's memory flat on one huge document.
    chunks = [t[i : i + 100_000] for t in sample for i in range(0, len(t), 100_000)]
    return train_bpe(chunks, spec.tokenizer.vocab_size)


def prepare_mixture(spec: MixtureSpec, cache_dir: Path = Path(".cache/tiktoken")) -> dict[str, Any]:
    """Tokenize every dataset of `spec` into `out_dir/<name>/{train,val}` and write `out_dir/mixture.json`."""
    splits = {}
    for ds in spec.datasets:
        docs = list(read_documents(ds.path, ds.format, ds.text_field))
        if not any(d.strip() for d in docs):
            raise DataError(f"dataset {ds.name!r} ({ds.path}) holds no text")
        splits[ds.name] = _split(docs, ds.val_fraction)
    tok = _tokenizer(spec, [t for train, _ in splits.values() for t in train], cache_dir)
    info = TokenizerInfo(tok.name, tok.fingerprint, tok.vocab_size, tok.eot_id)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer.kind == "bpe":
        tok.save(spec.out_dir / "tokenizer.json")  # type: ignore[attr-defined]
    probs = mixture_probabilities([d.weight for d in spec.datasets], spec.temperature)
    entries = []
    for ds, p in zip(spec.datasets, probs, strict=True):
        entry: dict[str, Any] = {"name": ds.name, "weight": ds.weight, "probability": float(p)}
        for split, docs in zip(("train", "val"), splits[ds.name], strict=True):
            manifest = write_shards(spec.out_dir / ds.name / split, (tok.encode(d) for d in docs), info,
                                    sources=[ds.path] if ds.path.is_file() else [], shard_tokens=spec.shard_tokens)
            text = (spec.out_dir / ds.name / split / "manifest.json").read_bytes()
            entry[split] = {"tokens": manifest["total_tokens"], "manifest_sha256": hashlib.sha256(text).hexdigest()}
        entry["sources"] = _describe_sources(ds.path)
        entries.append(entry)
    mixture = {"format": MIXTURE_FORMAT, "tokenizer": info.__dict__, "temperature": spec.temperature,
               "datasets": entries, "spec_fingerprint": fingerprint(spec)}
    (spec.out_dir / "mixture.json").write_text(json.dumps(mixture, indent=1, sort_keys=True) + "\n")
    return mixture


def load_tokenizer(root: Path, cache_dir: Path = Path(".cache/tiktoken"),
                   ranks_file: Path = Path("data/samples/tokenizers/o200k_base.tiktoken")) -> Tokenizer:
    """The tokenizer a prepared mixture was made with (checked against its fingerprint)."""
    info = TokenizerInfo(**read_mixture(root)["tokenizer"])
    tok: Tokenizer = (load_bpe(root / "tokenizer.json") if info.name == "bpe"
                      else tiktoken_from_file(info.name, ranks_file, cache_dir))
    if tok.fingerprint != info.fingerprint:
        raise DataError(f"{root}: tokenizer fingerprint {tok.fingerprint[:12]} differs from the mixture's "
                        f"{info.fingerprint[:12]}; prepare the mixture again")
    return tok


def read_mixture(root: Path) -> dict[str, Any]:
    path = root / "mixture.json"
    if not path.is_file():
        raise DataError(f"{root} holds no prepared mixture (mixture.json); run `cambium moe prep-mixture` first")
    try:
        mixture = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the mixture ({exc}); prepare it again") from None
    if not isinstance(mixture, dict) or mixture.get("format") != MIXTURE_FORMAT:
        found = mixture.get("format") if isinstance(mixture, dict) else type(mixture).__name__
        raise DataError(f"{path}: format {found!r} is not {MIXTURE_FORMAT!r}")
    return mixture


def verify_sources(root: Path) -> None:
    """Refuse a prepared mixture whose recorded source files changed on disk since it was prepared."""
    reason = _changed_source(read_mixture(root))
    if reason is not None:
        raise DataError(f"{root / 'mixture.json'}: {reason}; prepare the mixture again (e.g. `cambium moe "
                        "prep-mixture --config CONFIG`)")


def _describe_sources(path: Path) -> list[dict[str, Any]]:
    """Path, size and sha256 of a dataset's source: the file, or every file under an hf directory."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files]


def _changed_source(mixture: dict[str, Any]) -> str | None:
    """The first recorded source file whose size or sha256 differs on disk (a missing one cannot be checked)."""
    for dataset in mixture.get("datasets", []):
        for source in dataset.get("sources", []):
            path = Path(source["path"])
            if not path.is_file():
                continue
            if path.stat().st_size != source["bytes"] or file_sha256(path) != source["sha256"]:
                return (f"source {str(path)!r} of dataset {dataset['name']!r} changed since the mixture was prepared "
                        f"(sha256 {source['sha256'][:12]} then, {file_sha256(path)[:12]} now)")
    return None


def mixture_staleness(spec: MixtureSpec) -> str | None:
    """Why the mixture prepared in `spec.out_dir` does not match `spec` and its sources; None when it does."""
    path = spec.out_dir / "mixture.json"
    if not path.is_file():
        return f"{spec.out_dir} holds no prepared mixture"
    mixture = read_mixture(spec.out_dir)
    if mixture.get("spec_fingerprint") != fingerprint(spec):
        return f"{path} was prepared from another data.mixture spec (or before source hashes were recorded)"
    recorded = {d.get("name"): d.get("sources") for d in mixture["datasets"]}
    for ds in spec.datasets:
        if not ds.path.exists():
            continue
        paths = [Path(s["path"]) for s in recorded.get(ds.name) or []]
        current = sorted(p.resolve() for p in ds.path.rglob("*") if p.is_file()) if ds.path.is_dir() \
            else [ds.path.resolve()]
        if sorted(paths) != current:
            return f"dataset {ds.name!r} now reads other files than {path} records"
    return _changed_source(mixture)


def ensure_mixture(spec: MixtureSpec, *, rebuild: bool, how: str = "cambium moe prep-mixture --config CONFIG",
                   cache_dir: Path = Path(".cache/tiktoken")) -> None:
    """Prepare the mixture when it is missing or stale (`rebuild`), or refuse a stale one in one line."""
    reason = mixture_staleness(spec)
    if reason is None:
        return
    if rebuild or not (spec.out_dir / "mixture.json").exists():
        prepare_mixture(spec, cache_dir)
        return
    if "spec_fingerprint" not in read_mixture(spec.out_dir):
        # Prepared before hashes were recorded: nothing to compare with, so it is kept as the run found it.
        return
    raise DataError(f"prepared data is stale: {reason}; rebuild it with `{how}` (a run already trained on the old "
                    "data cannot resume on the new)")


class MixtureLoader:
    """Batches `[B, seq_len + 1]` (int64) drawn from a prepared mixture; rank r of W takes rows r::W."""

    def __init__(self, root: Path, *, split: Literal["train", "val"] = "train", seq_len: int, batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1, verify: bool = False) -> None:
        mixture = read_mixture(root)
        verify_sources(root)
        if batch_size % world_size:
            raise DataError(f"batch_size={batch_size} must be divisible by world_size={world_size}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.names = [d["name"] for d in mixture["datasets"]]
        self.probs = np.asarray([d["probability"] for d in mixture["datasets"]])
        self.shards = [TokenShards(root / n / split, verify=verify) for n in self.names]
        self.n_windows = [(len(s) - 1) // seq_len for s in self.shards]
        for name, n, s in zip(self.names, self.n_windows, self.shards, strict=True):
            if n < 1:
                raise DataError(f"dataset {name!r} ({split}) has {len(s)} tokens: too few for seq_len={seq_len}")
        self.batches = 0
        self.epoch = [0] * len(self.names)
        self.position = [0] * len(self.names)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, i: int, epoch: int) -> np.ndarray:
        key = (i, epoch)
        if key not in self._orders:
            self._orders = {k: v for k, v in self._orders.items() if k[0] != i}
            rng = np.random.default_rng([self.seed, i, epoch])
            self._orders[key] = rng.permutation(self.n_windows[i])
        return self._orders[key]

    def _take(self, i: int) -> np.ndarray:
        window = int(self._order(i, self.epoch[i])[self.position[i]])
        self.position[i] += 1
        if self.position[i] == self.n_windows[i]:
            self.epoch[i], self.position[i] = self.epoch[i] + 1, 0
        return self.shards[i].read(window * self.seq_len, self.seq_len + 1)

    def next_batch(self) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, 0x5EED, self.batches])
        choices = rng.choice(len(self.names), size=self.batch_size, p=self.probs)
        rows = [self._take(int(i)) for i in choices]
        self.batches += 1
        return torch.from_numpy(np.stack(rows[self.rank :: self.world_size]))

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed, "seq_len": self.seq_len,
                "datasets": {n: {"epoch": e, "position": p}
                             for n, e, p in zip(self.names, self.epoch, self.position, strict=True)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`; a cursor that is not one of this mixture's is a CheckpointError naming the
        key (it comes from a file: cursor.json)."""
        seed, seq_len = cursor_int(state, "seed"), cursor_int(state, "seq_len", low=1)
        datasets = state.get("datasets")
        if not isinstance(datasets, dict):
            raise CheckpointError(f"data cursor: datasets={datasets!r} must be an object with one entry per dataset")
        if (seed, seq_len) != (self.seed, self.seq_len) or set(datasets) != set(self.names):
            raise DataError("data cursor does not belong to this mixture (seed, seq_len or datasets differ)")
        batches = cursor_int(state, "batches")
        epoch, position = [], []
        for i, name in enumerate(self.names):
            where = f"data cursor: datasets.{name}"
            epoch.append(cursor_int(datasets[name], "epoch", where=where))
            position.append(cursor_int(datasets[name], "position", high=self.n_windows[i], where=where))
        self.batches, self.epoch, self.position = batches, epoch, position


def eval_windows(root: Path, name: str, *, seq_len: int, split: str = "val",
                 max_windows: int | None = None) -> Iterator[torch.Tensor]:
    """The windows `[seq_len + 1]` of one dataset in order, for evaluation (no sampling)."""
    shards = TokenShards(root / name / split)
    n = (len(shards) - 1) // seq_len
    for k in range(n if max_windows is None else min(n, max_windows)):
        yield torch.from_numpy(shards.read(k * seq_len, seq_len + 1))
