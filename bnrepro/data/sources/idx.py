"""MNIST-format idx files (MNIST, Fashion-MNIST): ``root/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.

"train" is read from the train files, "val" from the t10k ones. Their examples keep the files' stored order (the data
set as distributed), in virtual shards of ``shard_size`` consecutive examples, and are always resident: the files are
parsed (by ``bnrepro.data.mnist``, through its cache) into one uint8 tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnrepro.data import mnist
from bnrepro.data.idx import check_headers
from bnrepro.data.split import Split
from bnrepro.errors import UserError


def holds(root: Path, split: str) -> bool:
    return any((root / f"train-labels-idx1-ubyte{ext}").is_file() for ext in (".gz", ""))


def files(folder: Path) -> list[Path]:
    """The four idx files an idx folder is read from (each packed, ``.gz``, where that file exists)."""
    return [folder / name if (folder / name).is_file() else folder / name.removesuffix(".gz") for name in mnist.FILES]


def open_split(folder: Path, split: str, classes: list[str] | None, shard_size: int) -> Split:
    """MNIST-format idx files (parsed by ``mnist.read_folder``, through its cache), resident, in stored order."""
    if split not in ("train", "val"):
        raise UserError(f"the idx files in {folder} hold the splits 'train' and 'val' (the t10k files), not '{split}'")
    check_headers(files(folder))
    arrays = mnist.read_folder(folder)
    images, labels = (arrays.train_images, arrays.train_labels) if split == "train" else \
        (arrays.test_images, arrays.test_labels)
    names = class_names(folder)
    if classes is not None and list(classes) != names:
        raise UserError(f"the idx files in {folder} have the classes {', '.join(names)}, not the ones asked for")
    if not len(labels):
        raise UserError(f"the {split} idx files in {folder} hold no examples")
    stem = "train" if split == "train" else "t10k"
    path = folder / f"{stem}-images-idx3-ubyte.gz"
    path = path if path.is_file() else folder / f"{stem}-images-idx3-ubyte"
    n, record = len(labels), images[0].numel()
    starts = np.append(np.arange(0, n, shard_size, dtype=np.int64), n)
    kind = "MNIST" if names == [str(digit) for digit in range(10)] else "Fashion-MNIST"
    return Split([str(path)], np.zeros(n, np.int64), 16 + record * np.arange(n, dtype=np.int64),
                 np.full(n, record, np.int64), labels.numpy().astype(np.int64), names, starts, False,
                 f"{kind} idx files in {folder}", images.unsqueeze(1))


def class_names(source: Path) -> list[str]:
    """MNIST's digits, or Fashion-MNIST's class names (spaces and slashes replaced) where its train labels are the
    official file."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import check_integrity

    name, md5 = FashionMNIST.resources[1]  # the train labels tell the two data sets apart
    fashion = check_integrity(str(source / name), md5)
    return [c.replace(" ", "_").replace("/", "-") for c in FashionMNIST.classes] if fashion \
        else [str(digit) for digit in range(10)]

