from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from cambium.core.errors import DataError
from cambium.data.images import CIFAR10_DIR, augment, load_cifar10, normalize
from cambium.data.text import read_documents
from cambium.data.tokenizer import tiktoken_from_file

RANKS = Path("data/samples/tokenizers/o200k_base.tiktoken")


def test_cifar10_samples_load_with_the_known_first_labels() -> None:
    train = load_cifar10(batches=("data_batch_1",))
    test = load_cifar10(batches=("test_batch",))
    assert train.images.shape == (1017, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # the official order (README of the sample)
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert train.classes[:3] == ("airplane", "automobile", "bird") and len(train.classes) == 10
    x = normalize(train.images[:256])
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


def test_pickles_with_other_globals_are_refused(tmp_path: Path) -> None:
    (tmp_path / "batches.meta").write_bytes((CIFAR10_DIR / "batches.meta").read_bytes())
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": __import__("os").getcwd}))
    with pytest.raises(DataError, match="is not allowed in a CIFAR batch"):
        load_cifar10(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path, batches=("data_batch_9",))


def test_augment_is_a_reproducible_crop_and_flip() -> None:
    images = load_cifar10(limit=16).images
    a = augment(images, torch.Generator().manual_seed(0))
    b = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == images.shape
    same = augment(images, torch.Generator().manual_seed(0), pad=0)
    flipped = same.flip(-1)
    assert all(torch.equal(s, i) or torch.equal(f, i) for s, f, i in zip(same, flipped, images, strict=True))


def test_o200k_from_the_committed_file(tmp_path: Path) -> None:
    tok = tiktoken_from_file("o200k_harmony", RANKS, tmp_path / "cache")
    assert tok.vocab_size == 201_088 and tok.encode("Hello world") == [13225, 2375]
    assert tok.decode(tok.encode("naïve café ✓")) == "naïve café ✓"
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(RANKS.read_bytes()[:1000])
    with pytest.raises(DataError, match="sha256"):
        tiktoken_from_file("o200k_base", bad, tmp_path / "cache2")
    with pytest.raises(DataError, match="not supported"):
        tiktoken_from_file("cl100k_base", RANKS, tmp_path / "cache")


def test_text_formats(tmp_path: Path) -> None:
    p = tmp_path / "t.txt"
    p.write_text("a\nb\n\n\nc\n")
    assert list(read_documents(p, "paragraphs")) == ["a\nb\n", "c\n"]
    assert list(read_documents(p, "text")) == ["a\nb\n\n\nc\n"]
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8"):
        list(read_documents(p, "text"))


def test_hf_dataset_from_a_local_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["first doc", "second doc"], "n": [1, 2]})}
                         ).save_to_disk(str(tmp_path / "ds"))
    assert list(read_documents(tmp_path / "ds", "hf")) == ["first doc", "second doc"]
    with pytest.raises(DataError, match="no column 'body'"):
        list(read_documents(tmp_path / "ds", "hf", text_field="body"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"not a dataset saved with datasets\.save_to_disk"):
        list(read_documents(tmp_path / "empty", "hf"))


def test_a_hostile_batches_meta_is_one_data_error(tmp_path: Path) -> None:
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": __import__("os").getcwd}))
    with pytest.raises(DataError, match=r"batches\.meta: not a CIFAR-10 python metadata.*not allowed"):
        load_cifar10(tmp_path)
    (tmp_path / "batches.meta").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match=r"batches\.meta: not a CIFAR-10 python metadata"):
        load_cifar10(tmp_path)
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": 5}))
    with pytest.raises(DataError, match="label_names"):
        load_cifar10(tmp_path)


def test_a_small_pickle_cannot_expand_into_a_huge_batch(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "batches.meta").write_bytes((CIFAR10_DIR / "batches.meta").read_bytes())
    image = np.zeros(3072, dtype=np.uint8)
    # 20,000 references to one image pickle to ~60 KB and would become 61 MB in np.asarray (the real case: 859 MB).
    small = pickle.dumps({b"data": [image] * 20_000, b"labels": [0] * 20_000})
    assert len(small) < 100_000
    (tmp_path / "data_batch_1").write_bytes(small)
    with pytest.raises(DataError, match=r"b'data' must be a uint8 array \[N, 3072\], got list"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                          b"labels": [image, image]}))
    with pytest.raises(DataError, match="b'labels' must be 2 integers"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                                          b"labels": [1, 2]}))
    assert load_cifar10(tmp_path).labels.tolist() == [1, 2]
