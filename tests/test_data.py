"""MNIST loading (both folder layouts, checks, clear errors), binarization, and the mini-batch order."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FILES, SHARED_DATA, idx_images, idx_labels, make_split, write_mnist

from bnrepro import runs
from bnrepro.data import mnist
from bnrepro.errors import UserError


def _raw(root):
    return root / "mnist" / "raw"


@pytest.mark.parametrize("folder", ["mnist", "MNIST"])
def test_loads_generated_files_in_both_layouts(tmp_path, folder):
    root = write_mnist(tmp_path / "d", folder=folder)
    data = mnist.load(root)
    assert data.train_images.shape == (600, 28, 28)
    assert data.train_images.dtype == torch.uint8
    assert data.train_labels.shape == (600,)
    assert data.train_labels.dtype == torch.int64
    assert data.test_images.shape == (200, 28, 28)
    assert data.test_labels.shape == (200,)
    assert data.official is False
    assert data.source == str(root / folder / "raw")
    images, labels = make_split(600, seed=1)
    assert torch.equal(data.train_images, torch.from_numpy(images))
    assert torch.equal(data.train_labels, torch.from_numpy(labels).long())
    assert sorted(data.test_labels.unique().tolist()) == list(range(10))


def test_loads_files_that_were_already_extracted(fake_mnist):
    raw = _raw(fake_mnist)
    for name in FILES:
        with gzip.open(raw / name, "rb") as src:
            (raw / name.removesuffix(".gz")).write_bytes(src.read())
        (raw / name).unlink()
    data = mnist.load(fake_mnist)
    assert data.train_images.shape == (600, 28, 28)
    assert data.official is False


def test_data_dir_from_environment(fake_mnist, monkeypatch):
    monkeypatch.setenv("BNREPRO_DATA", str(fake_mnist))
    assert mnist.load().source == str(_raw(fake_mnist))


def test_the_cache_is_the_isolated_one(isolated_cache):
    assert runs.cache_dir() == isolated_cache
    assert mnist.data_root(None) == (isolated_cache, True)


def test_file_names_are_torchvisions():
    from torchvision.datasets import MNIST

    assert [name for name, _ in MNIST.resources] == mnist.FILES


def test_parsed_once_then_read_from_the_cache(fake_mnist, monkeypatch):
    first = mnist.load(fake_mnist)
    monkeypatch.setattr(mnist, "_parse", lambda folder: pytest.fail("parsed again"))
    again = mnist.load(fake_mnist)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    assert (again.source, again.official) == (first.source, first.official)


def test_a_replaced_file_is_parsed_again(fake_mnist):
    mnist.load(fake_mnist)
    labels = (make_split(200, seed=2)[1] + 1) % 10
    with gzip.open(_raw(fake_mnist) / FILES[3], "wb") as f:
        f.write(idx_labels(labels))
    assert torch.equal(mnist.load(fake_mnist).test_labels, torch.from_numpy(labels).long())


def test_a_file_corrupted_in_place_is_caught_despite_the_cache(fake_mnist):
    """Same size, same modification time (as `cp -p` or bit rot leaves it): the cache goes by the bytes."""
    mnist.load(fake_mnist)
    path = _raw(fake_mnist) / FILES[3]
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[20:40] = bytes(20)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError, match="corrupt"):
        mnist.load(fake_mnist)


def test_the_cached_source_is_the_folder_asked_for(fake_mnist, monkeypatch):
    mnist.load(fake_mnist)
    monkeypatch.chdir(fake_mnist)
    assert mnist.load(Path(".")).source == str(Path("mnist/raw"))


def test_a_damaged_cache_entry_is_parsed_again(fake_mnist, isolated_cache):
    first = mnist.load(fake_mnist)
    (entry,) = (isolated_cache / "mnist-parsed").glob("*.pt")
    entry.write_bytes(b"not a tensor file")
    assert torch.equal(mnist.load(fake_mnist).train_labels, first.train_labels)


def test_missing_data_names_the_folders_searched(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(UserError) as caught:
        mnist.load(nowhere)
    message = str(caught.value)
    assert str(nowhere / "mnist" / "raw") in message
    assert str(nowhere / "MNIST" / "raw") in message
    assert "\n" not in message


def test_incomplete_folder_is_missing_data(fake_mnist):
    (_raw(fake_mnist) / FILES[3]).unlink()
    with pytest.raises(UserError, match="not found"):
        mnist.load(fake_mnist)


def test_missing_data_in_cache_and_package_without_download(isolated_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "EMBEDDED", tmp_path / "deleted")  # an install that dropped the package's copy
    with pytest.raises(UserError) as caught:
        mnist.load(None, download=False)
    assert str(isolated_cache / "mnist" / "raw") in str(caught.value)
    assert str(tmp_path / "deleted") in str(caught.value)


def _no_download(root):
    pytest.fail(f"tried to download MNIST into {root}")


def test_the_cache_comes_before_the_embedded_copy(isolated_cache, monkeypatch):
    monkeypatch.setattr(mnist, "_download", _no_download)
    write_mnist(isolated_cache)
    data = mnist.load()
    assert (data.source, data.copy, data.official) == (str(_raw(isolated_cache)), "user cache", False)


@pytest.mark.parametrize("how", ["--data-dir", "BNREPRO_DATA"])
def test_an_explicit_folder_without_mnist_is_an_error_not_the_embedded_copy(tmp_path, monkeypatch, how):
    monkeypatch.setattr(mnist, "_download", _no_download)
    if how == "BNREPRO_DATA":
        monkeypatch.setenv("BNREPRO_DATA", str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        mnist.load(tmp_path if how == "--data-dir" else None)


def test_downloads_into_the_cache_only_when_the_embedded_copy_is_gone(isolated_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "EMBEDDED", tmp_path / "deleted")
    downloads = []
    monkeypatch.setattr(mnist, "_download", lambda root: downloads.append(root) or write_mnist(root))
    data = mnist.load()
    assert downloads == [isolated_cache]
    assert (data.source, data.copy) == (str(_raw(isolated_cache)), "downloaded into the user cache")


def test_the_embedded_files_are_the_official_ones():
    """Byte for byte the four files torchvision downloads (its MD5s), and the shared copy where there is one."""
    from torchvision.datasets import MNIST

    for name, md5 in MNIST.resources:
        data = (mnist.EMBEDDED / name).read_bytes()
        assert hashlib.md5(data).hexdigest() == md5, name
        if (SHARED_DATA / "mnist" / "raw" / name).is_file():
            assert data == (SHARED_DATA / "mnist" / "raw" / name).read_bytes(), name
    notice = (mnist.EMBEDDED / "NOTICE.md").read_text()
    for words in ("Yann LeCun", "Corinna Cortes", "Burges", "CC BY-SA 3.0", "http://yann.lecun.com/exdb/mnist/"):
        assert words in notice


def test_the_digest_is_the_data_not_its_files(fake_mnist, tmp_path):
    """Extracted files hold the same arrays as the .gz ones (same digest); one changed label is other data."""
    packed = mnist.load(fake_mnist)
    extracted = write_mnist(tmp_path / "extracted")
    for name in FILES:
        with gzip.open(_raw(extracted) / name, "rb") as src:
            (_raw(extracted) / name.removesuffix(".gz")).write_bytes(src.read())
        (_raw(extracted) / name).unlink()
    assert mnist.load(extracted).arrays_sha256 == packed.arrays_sha256
    labels = make_split(200, seed=2)[1]
    labels[0] = (labels[0] + 1) % 10
    with gzip.open(_raw(fake_mnist) / FILES[3], "wb") as f:
        f.write(idx_labels(labels))
    assert mnist.load(fake_mnist).arrays_sha256 != packed.arrays_sha256
    assert len(packed.arrays_sha256) == 64


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_gzip(path):
    path.write_bytes(b"this is not a gzip file at all" * 10)


def _bad_deflate(path):
    """A valid gzip header followed by a deflate stream with an invalid block type."""
    path.write_bytes(gzip.compress(b"x")[:10] + b"\xff" * 64)


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate,
        _not_gzip,
        _bad_deflate,
    ],
    ids=["truncated", "not-gzip", "bad-deflate"],
)
@pytest.mark.parametrize("name", [FILES[0], FILES[3]])
def test_corrupt_file_is_a_user_error_naming_it(fake_mnist, corrupt, name):
    corrupt(_raw(fake_mnist) / name)
    with pytest.raises(UserError) as caught:
        mnist.load(fake_mnist)
    assert name in str(caught.value)
    assert "\n" not in str(caught.value)


def _write_gz(path, data: bytes):
    with gzip.open(path, "wb") as f:
        f.write(data)


def test_image_and_label_counts_must_agree(fake_mnist):
    _, labels = make_split(599, seed=1)
    _write_gz(_raw(fake_mnist) / "train-labels-idx1-ubyte.gz", idx_labels(labels))
    with pytest.raises(UserError) as caught:
        mnist.load(fake_mnist)
    message = str(caught.value)
    assert "train" in message and "600" in message and "599" in message
    assert "\n" not in message


def test_wrong_image_size_is_rejected(fake_mnist):
    images, _ = make_split(200, seed=2)
    _write_gz(_raw(fake_mnist) / "t10k-images-idx3-ubyte.gz", idx_images(images.reshape(200, 14, 56)))
    with pytest.raises(UserError, match="test"):
        mnist.load(fake_mnist)


def test_a_label_file_in_place_of_images_is_rejected(fake_mnist):
    raw = _raw(fake_mnist)
    shutil.copyfile(raw / "train-labels-idx1-ubyte.gz", raw / "train-images-idx3-ubyte.gz")
    with pytest.raises(UserError) as caught:
        mnist.load(fake_mnist)
    assert "\n" not in str(caught.value)


def _image(row: list[int]) -> torch.Tensor:
    """One 28x28 uint8 image whose rows all repeat ``row`` (len 4) seven times."""
    return torch.tensor([[row * 7] * 28], dtype=torch.uint8)


def test_binarize_threshold():
    bits = mnist.binarize(torch.cat([_image([0, 127, 128, 255])] * 3), 0.5)
    assert bits.dtype == torch.bool
    assert bits.shape == (3, 784)
    assert bits[0, :4].tolist() == [False, False, True, True]  # pixel/255 > 0.5: the cut is at 127.5
    assert int(bits.sum()) == 3 * 784 // 2
    edge = _image([0, 1, 254, 255])
    assert mnist.binarize(edge, 0.0)[0, :4].tolist() == [False, True, True, True]  # strictly greater
    assert mnist.binarize(edge, 254 / 255)[0, :4].tolist() == [False, False, False, True]
    assert mnist.binarize(edge, 0.999)[0, :4].tolist() == [False, False, False, True]


def test_epoch_batches_are_a_pure_function_of_the_step():
    a = mnist.EpochBatches(100, 10, seed=3)
    forward = [a.indices(step).clone() for step in range(35)]
    b = mnist.EpochBatches(100, 10, seed=3)
    for step in [34, 0, 12, 11, 29, 3, 20, 10, 9]:
        assert torch.equal(b.indices(step), forward[step]), step
        assert torch.equal(mnist.EpochBatches(100, 10, seed=3).indices(step), forward[step]), step
    other = mnist.EpochBatches(100, 10, seed=4)
    assert not all(torch.equal(other.indices(s), forward[s]) for s in range(10))


def test_epoch_batches_cover_every_example_once_per_epoch():
    batches = mnist.EpochBatches(120, 20, seed=0)
    assert batches.per_epoch == 6
    epochs = []
    for epoch in range(3):
        seen = torch.cat([batches.indices(epoch * 6 + k) for k in range(6)])
        assert sorted(seen.tolist()) == list(range(120))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # a fresh permutation each epoch


def test_epoch_batches_drop_the_last_partial_batch():
    batches = mnist.EpochBatches(25, 10, seed=0)
    assert batches.per_epoch == 2
    first = torch.cat([batches.indices(0), batches.indices(1)])
    assert all(len(batches.indices(s)) == 10 for s in range(7))
    assert len(set(first.tolist())) == 20
    assert set(first.tolist()) <= set(range(25))


def test_batch_larger_than_the_data_is_a_user_error():
    with pytest.raises(UserError):
        mnist.EpochBatches(50, 60, seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "mnist" / "raw").is_dir(), reason="no ../shared/data/mnist beside the checkout")
def test_real_mnist():
    data = mnist.load(SHARED_DATA)
    assert data.official is True
    assert data.train_images.shape == (60_000, 28, 28)
    assert data.train_labels.shape == (60_000,)
    assert data.test_images.shape == (10_000, 28, 28)
    assert data.test_labels.shape == (10_000,)
    assert sorted(data.train_labels.unique().tolist()) == list(range(10))
    bits = mnist.binarize(data.train_images, 0.5)
    assert 0.05 < bits.float().mean() < 0.25  # binary MNIST: about 13% of the pixels are on


def test_labels_must_be_digits(fake_mnist):
    _, labels = make_split(200, seed=2)
    labels[7] = 12
    _write_gz(_raw(fake_mnist) / "t10k-labels-idx1-ubyte.gz", idx_labels(labels))
    with pytest.raises(UserError, match="test labels .* not all digits 0-9"):
        mnist.load(fake_mnist)
