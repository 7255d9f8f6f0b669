"""Resident data: idx folders and small same-size image splits decoded once into ``Split.pixels``, the same
examples in the same order as the files give them, cached by the files' bytes, and left as they were when
they cannot be (mixed sizes, an unreadable image)."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FILES, SHARED_DATA, make_split, write_mnist
from torchvision.io import encode_png
from torchvision.transforms import v2

from bnrepro.data import mnist, pipeline, sources, transforms
from bnrepro.data import order as ordering
from bnrepro.data import resident as resident_data
from bnrepro.data.pack import pack
from bnrepro.data.resident import make_resident
from bnrepro.data.split import Split, decode
from bnrepro.errors import UserError


class Decoded(Exception):
    """Raised by a ``decode`` patched in to prove that nothing is decoded."""


def no_decoding(data):
    raise Decoded


def address(split: Split) -> tuple:
    return split.file_of, split.offset, split.size


def decoded(split: Split, i: int) -> torch.Tensor:
    return decode(torch.frombuffer(bytearray(split.read(i)), dtype=torch.uint8))


@pytest.fixture
def raw(tmp_path) -> Path:
    """A small MNIST-format folder (50 train, 20 t10k examples), gzip'd idx files as distributed."""
    return write_mnist(tmp_path / "data", n_train=50, n_test=20) / "mnist" / "raw"


@pytest.fixture
def packed(raw, tmp_path) -> Path:
    """The same examples packed as PNG tar shards of 16."""
    pack(raw, tmp_path / "packed", shard_size=16)
    return tmp_path / "packed"


def write_folder(root: Path, sizes: list[tuple[int, int]], colour: bool = False) -> Path:
    """``root/train/<a|b>/<i>.png``: one PNG per size given, gray (or, with ``colour``, the last one RGB)."""
    generator = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        folder = root / "train" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        channels = 3 if colour and i == len(sizes) - 1 else 1
        pixels = torch.randint(0, 256, (channels, h, w), dtype=torch.uint8, generator=generator)
        (folder / f"{i}.png").write_bytes(encode_png(pixels).numpy().tobytes())
    return root


# --- the same examples, in the same order ----------------------------------------------------------------


def test_resident_shards_hold_what_the_files_decode_to(packed):
    split = sources.open_split(packed, "train")
    held = make_resident(split)
    assert split.pixels is None and held.pixels is not None
    assert held.pixels.shape == (50, 1, 28, 28) and held.pixels.dtype == torch.uint8  # gray: one channel
    for i in range(len(split)):
        assert torch.equal(held.pixels[i].expand(3, -1, -1), decoded(split, i))
        assert torch.equal(held.image(i), decoded(split, i)) and torch.equal(decoded(held, i), decoded(split, i))
    assert held.labels.tolist() == split.labels.tolist()
    assert held.shard_starts.tolist() == split.shard_starts.tolist() == [0, 16, 32, 48, 50]
    assert all((a == b).all() for a, b in zip(address(held), address(split)))
    again = sources.open_split(packed, "train", resident=True)
    assert torch.equal(again.pixels, held.pixels)


@pytest.mark.parametrize("order", ["shards", "within_shard"])
def test_resident_and_file_backed_streams_are_the_same(packed, order):
    split = sources.open_split(packed, "train")
    held = make_resident(split)
    streams = [ordering.TrainingStream(s, order, seed=3, batch_size=8, rank=0, world=1, start_step=2, buffer_shards=2)
               for s in (split, held)]
    batches = [list(itertools.islice(iter(stream), 20)) for stream in streams]  # 3 epochs and a bit
    assert batches[0] == batches[1]
    examples = [pipeline.Examples(s, v2.Identity(), seed=3, jpegs_as_bytes=False) for s in (split, held)]
    for item in batches[0][0]:
        (a, label_a, p_a), (b, label_b, p_b) = (dataset[item] for dataset in examples)
        assert torch.equal(a, b) and (label_a, p_a) == (label_b, p_b)
        assert a.shape == (3, 28, 28)


def test_a_resident_example_is_augmented_with_its_own_seed(packed):
    split = sources.open_split(packed, "train")
    held = make_resident(split)
    transform = transforms.training_transform(20, 0.5, (0.75, 1.33), True, {"brightness": 0.2})
    for dataset in (pipeline.Examples(s, transform, seed=5, jpegs_as_bytes=True) for s in (split, held)):
        image, _, _ = dataset[(123, 7)]
        expected = transforms.augment(decoded(split, 7), transform, ordering.example_seed(5, 123))
        assert torch.equal(image, expected)


# --- idx folders -----------------------------------------------------------------------------------------


def test_an_idx_folder_opens_resident_in_stored_order(raw):
    train_images, train_labels = make_split(50, seed=1)  # what write_mnist wrote, in that order
    split = sources.open_split(raw, "train", shard_size=16)
    assert split.pixels.shape == (50, 1, 28, 28) and split.pixels.dtype == torch.uint8
    assert np.array_equal(split.pixels[:, 0].numpy(), train_images)
    assert split.labels.tolist() == train_labels.tolist() and split.labels.dtype == np.int64
    assert split.shard_starts.tolist() == [0, 16, 32, 48, 50] and not split.packed
    assert split.classes == [str(digit) for digit in range(10)]
    assert split.where == f"MNIST idx files in {raw}"
    assert torch.equal(split.image(3), torch.from_numpy(train_images[3]).expand(3, -1, -1))
    assert torch.equal(decoded(split, 3), split.image(3))  # read() gives a PNG of the resident pixels
    assert (split.files[split.file_of[3]], split.offset[3], split.size[3]) == (str(raw / FILES[0]), 16 + 3 * 784, 784)
    assert sources.open_split(raw, "train").shard_starts.tolist() == [0, 50]

    val_images, val_labels = make_split(20, seed=2)
    val = sources.open_split(raw, "val", split.classes, shard_size=16)
    assert np.array_equal(val.pixels[:, 0].numpy(), val_images) and val.labels.tolist() == val_labels.tolist()
    assert val.shard_starts.tolist() == [0, 16, 20]


def test_an_idx_folder_matches_its_packed_shards(raw, packed):
    """The same data set, two sources: the same examples, each with its label (pack shuffles their order)."""
    idx, shards = sources.open_split(raw, "train"), make_resident(sources.open_split(packed, "train"))
    key = lambda s: sorted((s.pixels[i].numpy().tobytes(), int(s.labels[i])) for i in range(len(s)))  # noqa: E731
    assert key(idx) == key(shards) and idx.classes == shards.classes


def test_extracted_idx_files_open_too(raw, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in FILES:
        (plain / name.removesuffix(".gz")).write_bytes(gzip.decompress((raw / name).read_bytes()))
    split = sources.open_split(plain, "val")
    assert torch.equal(split.pixels, sources.open_split(raw, "val").pixels)
    assert split.files == [str(plain / "t10k-images-idx3-ubyte")]


def test_an_idx_folder_is_parsed_through_the_mnist_cache(raw, monkeypatch):
    first = sources.open_split(raw, "train")
    monkeypatch.setattr(mnist, "_parse", lambda folder: pytest.fail("parsed again"))
    assert torch.equal(sources.open_split(raw, "train").pixels, first.pixels)


def test_idx_folders_refuse_other_splits_and_classes(raw):
    with pytest.raises(UserError, match="'train' and 'val'"):
        sources.open_split(raw, "test")
    with pytest.raises(UserError, match="classes"):
        sources.open_split(raw, "val", ["cat", "dog"])


# --- the cache -------------------------------------------------------------------------------------------


def test_the_second_time_nothing_is_decoded(packed, isolated_cache, monkeypatch):
    split = sources.open_split(packed, "train")
    first = make_resident(split)
    assert len(list((isolated_cache / "resident").glob("*.pt"))) == 1
    monkeypatch.setattr(resident_data, "decode", no_decoding)
    again = make_resident(sources.open_split(packed, "train"))
    assert torch.equal(again.pixels, first.pixels)
    with pytest.raises(Decoded):  # without the cache it decodes
        make_resident(split, cache=False)


def test_an_edited_file_misses_the_cache(tmp_path, isolated_cache, monkeypatch):
    root = write_folder(tmp_path, [(12, 10)] * 6)
    split = sources.open_split(root, "train", shard_size=4)
    first = make_resident(split)
    assert first.pixels.shape == (6, 1, 12, 10)
    path = Path(split.files[2])  # same address, other bytes
    path.write_bytes(encode_png(torch.full((1, 12, 10), 7, dtype=torch.uint8)).numpy().tobytes())
    real_decode = decode
    monkeypatch.setattr(resident_data, "decode", no_decoding)
    with pytest.raises(Decoded):
        make_resident(sources.open_split(root, "train", shard_size=4))
    monkeypatch.setattr(resident_data, "decode", real_decode)
    edited = make_resident(sources.open_split(root, "train", shard_size=4))
    assert torch.equal(edited.pixels[2], torch.full((1, 12, 10), 7, dtype=torch.uint8))
    assert torch.equal(edited.pixels[:2], first.pixels[:2]) and torch.equal(edited.pixels[3:], first.pixels[3:])
    assert len(list((isolated_cache / "resident").glob("*.pt"))) == 1  # the entry was replaced


def test_a_damaged_cache_entry_is_decoded_again(packed, isolated_cache):
    first = make_resident(sources.open_split(packed, "train"))
    (entry,) = (isolated_cache / "resident").glob("*.pt")
    entry.write_bytes(b"not a tensor file")
    assert torch.equal(make_resident(sources.open_split(packed, "train")).pixels, first.pixels)


def test_no_cache_writes_nothing(packed, isolated_cache):
    assert make_resident(sources.open_split(packed, "train"), cache=False).pixels.shape == (50, 1, 28, 28)
    assert not (isolated_cache / "resident").exists()


# --- when it cannot be -----------------------------------------------------------------------------------


def test_mixed_sizes_stay_file_backed_say_why_and_are_not_decoded_again(tmp_path, isolated_cache, monkeypatch,
                                                                         capsys):
    root = write_folder(tmp_path, [(12, 10), (12, 10), (14, 10), (12, 10)])
    split = sources.open_split(root, "train")
    assert make_resident(split) is split and split.pixels is None
    assert "read from its files at every step" in capsys.readouterr().err  # the slowdown is never silent
    monkeypatch.setattr(resident_data, "decode", no_decoding)  # the answer is cached with the files' digest
    assert sources.open_split(root, "train", resident=True).pixels is None
    assert "its images differ in size" in capsys.readouterr().err


def test_an_unreadable_image_stays_file_backed(tmp_path):
    root = write_folder(tmp_path, [(12, 10)] * 4)
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG this is not a png")
    split = sources.open_split(root, "train")
    assert make_resident(split) is split and split.pixels is None
    (root / "train" / "a" / "broken.png").write_bytes(b"")
    assert sources.open_split(root, "train", resident=True).pixels is None


def test_colour_keeps_three_channels_and_gray_ones_match(tmp_path):
    root = write_folder(tmp_path, [(12, 10)] * 5, colour=True)
    split = sources.open_split(root, "train")
    held = make_resident(split)
    assert held.pixels.shape == (5, 3, 12, 10)
    for i in range(len(split)):
        assert torch.equal(held.pixels[i], decoded(split, i)) and torch.equal(held.image(i), decoded(split, i))


# --- the real data set -----------------------------------------------------------------------------------


@pytest.mark.skipif(not (SHARED_DATA / "fashion-mnist" / "raw").is_dir(), reason="no Fashion-MNIST here")
def test_fashion_mnist_opens_resident():
    folder = SHARED_DATA / "fashion-mnist" / "raw"
    train, val = sources.open_split(folder, "train"), sources.open_split(folder, "val")
    assert (len(train), len(val)) == (60_000, 10_000)
    assert train.pixels.shape == (60_000, 1, 28, 28) and val.pixels.shape == (10_000, 1, 28, 28)
    assert len(train.classes) == 10 and train.classes[0] == "T-shirt-top" and val.classes == train.classes
    assert train.where == f"Fashion-MNIST idx files in {folder}"
    assert len(train.shard_starts) - 1 == 60 and sorted(set(train.labels.tolist())) == list(range(10))
