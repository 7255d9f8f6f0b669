"""MNIST through torchvision, from the original ``.gz`` files wherever they already are.

Looked for, in order: ``DIR/mnist/raw/`` and ``DIR/MNIST/raw/`` for ``DIR`` = ``--data-dir``, else
``$BNREPRO_DATA``, else the user cache (``$BNREPRO_CACHE`` or ``~/.cache/bnrepro``). The four ``.gz``
files are read as they are (checked against torchvision's MD5s, recorded in the manifest); files
torchvision extracted earlier work too. Only the user cache is downloaded into, by torchvision.

torchvision parses a folder once; the tensors are then kept in the user cache while the files are
unchanged, so later runs need not import torchvision at all: that import alone takes ~3 s (it pulls in
``torch._dynamo``), a tenth of a 1-seed experiment.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bnrepro.engine import checkpoint
from bnrepro.errors import UserError
from bnrepro.runs import cache_dir

FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",  # as torchvision's MNIST.resources names them
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
HOW_TO_GET = ("put the four original MNIST .gz files in DIR/mnist/raw/ and pass --data-dir DIR "
              "(or set BNREPRO_DATA=DIR), or run once with internet access to download them")


@dataclass(frozen=True)
class MnistArrays:
    """MNIST as tensors: uint8 images (N, 28, 28) and int64 labels (N,), plus where they came from."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str
    official: bool  # all four files match the MD5s torchvision publishes


def data_root(data_dir: Path | None) -> tuple[Path, bool]:
    """The folder to search, and whether it is the user cache (the only place we download into)."""
    if data_dir is not None:
        return Path(data_dir), False
    if os.environ.get("BNREPRO_DATA"):
        return Path(os.environ["BNREPRO_DATA"]), False
    return cache_dir(), True


def _raw_folder(root: Path) -> Path | None:
    for name in ("mnist", "MNIST"):
        folder = root / name / "raw"
        if all((folder / f).is_file() or (folder / f.removesuffix(".gz")).is_file() for f in FILES):
            return folder
    return None


def load(data_dir: Path | None = None, download: bool = True) -> MnistArrays:
    """Find (or, in the user cache, download) MNIST and return it as tensors; any problem is a UserError."""
    root, is_cache = data_root(data_dir)
    folder = _raw_folder(root)
    if folder is None and is_cache and download:
        from torchvision.datasets import MNIST

        try:
            MNIST(root=str(root), train=True, download=True)
        except Exception as err:  # no network, mirror down, disk full: all mean the same to the user
            raise UserError(f"MNIST is not in {root} and downloading it failed ({err.__class__.__name__}); "
                            f"{HOW_TO_GET}") from None
        folder = _raw_folder(root)
    if folder is None:
        looked = ", ".join(str(root / name / "raw") for name in ("mnist", "MNIST"))
        raise UserError(f"MNIST not found (looked in {looked}); {HOW_TO_GET}")
    return read_folder(folder)


def read_folder(folder: Path, cache: bool = True) -> MnistArrays:
    """The idx files of ``folder``, parsed by torchvision. With ``cache`` the tensors are kept in the user cache,
    one entry per folder, and reused while the files' bytes are unchanged (their SHA-256, ~20 ms to compute),
    so later runs need not import torchvision."""
    if not cache:
        return _parse(folder)
    try:
        digest = _digest(folder)
    except OSError:  # a file is missing or unreadable: parsing says which
        return _parse(folder)
    entry = cache_dir() / "mnist-parsed" / f"{hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]}.pt"
    names = {field.name for field in fields(MnistArrays)}
    saved = cached(entry, digest, lambda: asdict(_parse(folder)), accept=lambda saved: set(saved) == names)
    return replace(MnistArrays(**saved), source=str(folder))


def cached(entry: Path, digest: str, make: Callable[[], dict[str, Any] | None],
           accept: Callable[[dict[str, Any]], bool] = lambda saved: True) -> dict[str, Any] | None:
    """``make()``'s tensors (a dict), kept in the user cache file ``entry`` and returned from there while
    ``digest`` (of whatever they are made from) is unchanged and ``accept`` takes them. A missing, stale or
    damaged entry is made again and replaced atomically; a ``None`` from ``make`` is not kept; a read-only
    cache only costs the saving."""
    try:
        saved = torch.load(entry, weights_only=True)
        if saved.pop("digest") == digest and accept(saved):
            return saved
    except Exception:  # none yet, or damaged: make it again
        pass
    made = make()
    if made is not None:
        with contextlib.suppress(OSError):  # a read-only cache: the next run makes it again, nothing worse
            entry.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save(entry, {**made, "digest": digest})
    return made


def _digest(folder: Path) -> str:
    """SHA-256 of the four files as found (packed or extracted): their names and bytes."""
    digest = hashlib.sha256()
    for name in FILES:
        path = folder / name if (folder / name).is_file() else folder / name.removesuffix(".gz")
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _parse(folder: Path) -> MnistArrays:
    """Parse the idx files with torchvision, from a scratch copy laid out the way its MNIST class expects."""
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity

    official = all(check_integrity(str(folder / name), md5) for name, md5 in MNIST.resources)
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in FILES:
            _extract(folder, name, raw / name.removesuffix(".gz"))
        try:
            train, test = (MNIST(root=scratch, train=flag) for flag in (True, False))
        except (AssertionError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"the MNIST files in {folder} are not valid idx files ({err or 'bad header'}); "
                            "replace them with the originals") from None
    for split, data in (("train", train), ("test", test)):
        if len(data.data) != len(data.targets) or data.data.shape[1:] != (28, 28):
            raise UserError(f"the MNIST {split} files in {folder} disagree: {len(data.data)} images of "
                            f"{tuple(data.data.shape[1:])} but {len(data.targets)} labels; replace them")
        if len(data.targets) and not 0 <= int(data.targets.min()) <= int(data.targets.max()) <= 9:
            raise UserError(f"the MNIST {split} labels in {folder} are not all digits 0-9; replace the file")
    return MnistArrays(train.data, train.targets, test.data, test.targets, str(folder), official)


def _extract(folder: Path, name: str, target: Path) -> None:
    packed, unpacked = folder / name, folder / name.removesuffix(".gz")
    try:
        if packed.is_file():
            with gzip.open(packed, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            shutil.copyfile(unpacked, target)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise UserError(f"cannot read {packed if packed.is_file() else unpacked}: it is corrupt or "
                        f"truncated ({err.__class__.__name__}); replace it with the original") from None


def binarize(images: Tensor, threshold: float) -> Tensor:
    """The paper's binary input: (N, 28, 28) uint8 -> (N, 784) bool, pixel/255 > threshold."""
    return images.reshape(len(images), -1) > threshold * 255


class EpochBatches:
    """Mini-batches as a pure function of the step: each epoch is a fresh permutation from (seed, epoch).

    Resuming at step k therefore sees exactly the batches an uninterrupted run would; the last partial
    batch of an epoch is dropped so every step has ``batch_size`` examples.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        if batch_size > size:
            raise UserError(f"batch size {batch_size} is larger than the {size} training examples")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = size // batch_size
        self._epoch, self._order = -1, None

    def indices(self, step: int) -> Tensor:
        epoch, within = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        return self._order[within * self.batch_size : (within + 1) * self.batch_size]
