"""Shared fixtures: an isolated user cache for every test, and a small, learnable MNIST in the original format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Small CPU models: one thread is fastest, and it keeps the suite quick when the CPU is shared (two
    threads on a busy 2-core machine spin against each other and run many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def native_builds(tmp_path_factory) -> Path:
    """Where this session's tests build the native kernels: once for all of them, CLI subprocesses included."""
    return tmp_path_factory.mktemp("native-builds")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch, native_builds):
    """Nothing may read, write or download into the real user cache, nor pick up a user's data folder."""
    cache = tmp_path_factory.mktemp("bnrepro-cache")
    (cache / "native").symlink_to(native_builds, target_is_directory=True)
    monkeypatch.setenv("BNREPRO_CACHE", str(cache))
    monkeypatch.delenv("BNREPRO_DATA", raising=False)
    return cache


@pytest.fixture
def native_engine():
    """The native MNIST kernel; the test is skipped where it cannot be built (no C++ compiler)."""
    from bnrepro import native

    try:
        return native.library("mlp")
    except native.Unavailable as error:
        pytest.skip(f"no native engine here: {error}")


def idx_images(images: np.ndarray) -> bytes:
    """The idx3 encoding of (N, 28, 28) uint8 images: magic 2051, then N, 28, 28 (big-endian), then the pixels."""
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    """The idx1 encoding of (N,) uint8 labels: magic 2049, then N (big-endian), then the labels."""
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def class_patterns(seed: int = 1234) -> np.ndarray:
    """One fixed set of 120 'on' pixels per class (10, 784), as bool masks."""
    rng = np.random.default_rng(seed)
    patterns = np.zeros((10, 784), dtype=bool)
    for digit in range(10):
        patterns[digit, rng.choice(784, size=120, replace=False)] = True
    return patterns


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images whose class is learnable: the class pattern, with 15% of its pixels dropped and noise added."""
    rng = np.random.default_rng(seed)
    patterns = class_patterns()
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    on = patterns[labels] & (rng.random((n, 784)) > 0.15)
    on |= rng.random((n, 784)) < 0.05
    pixels = np.where(on, rng.integers(160, 256, (n, 784)), rng.integers(0, 100, (n, 784)))
    return pixels.astype(np.uint8).reshape(n, 28, 28), labels.astype(np.uint8)


def write_mnist(root: Path, n_train: int = 600, n_test: int = 200, folder: str = "mnist") -> Path:
    """Write the four gzip'd idx files under ``root/folder/raw``; returns ``root``."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = make_split(n_train, seed=1)
    test_images, test_labels = make_split(n_test, seed=2)
    contents = [idx_images(train_images), idx_labels(train_labels), idx_images(test_images), idx_labels(test_labels)]
    for name, data in zip(FILES, contents):
        with open(raw / name, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as f:
            f.write(data)  # mtime 0: the same bytes whenever written (data identities hash them)
    return Path(root)


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    """A small (600 train, 200 test), valid, learnable MNIST in DIR/mnist/raw; returns DIR."""
    return write_mnist(tmp_path / "fake-data")


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    """The first Markdown table in ``text``: first cell of each row -> column -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {row[header[0]]: row for row in rows}
