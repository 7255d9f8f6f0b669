"""CIFAR-10 as torchvision distributes it: the python batches ``cifar-10-batches-py/`` (``data_batch_1..5``: "train";
``test_batch``: "val"; ``batches.meta``: the class names), found in ``root`` or in ``root/cifar-10-batches-py``.

The original pixels, unlike the JPEG re-encodings of ``shared/data/cifar10`` (a class-folder copy, read by
``folders``). Always resident (60,000 images of 32 x 32, 184 MB), in the batches' stored order (random as
distributed, so classes mix; the same for every run seed), in virtual shards of ``shard_size`` consecutive examples.
``fetch`` downloads the archive into the user cache when absent, checked by its MD5 (torchvision's own download).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from bnrepro.data.split import Split
from bnrepro.errors import UserError
from bnrepro.runs import cache_dir

FOLDER = "cifar-10-batches-py"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
VAL = ["test_batch"]
SIDE = 32


def batches_folder(root: Path) -> Path:
    return root / FOLDER if (root / FOLDER).is_dir() else root


def holds(root: Path, split: str) -> bool:
    return (batches_folder(root) / "batches.meta").is_file()


def open_split(root: Path, split: str, classes: list[str] | None, shard_size: int) -> Split:
    """The split's images from its batches, resident, in stored order."""
    folder = batches_folder(root)
    if split not in ("train", "val"):
        raise UserError(f"CIFAR-10's batches in {folder} hold the splits 'train' and 'val' (test_batch), not '{split}'")
    names = class_names(folder)
    if classes is not None and list(classes) != names:
        raise UserError(f"CIFAR-10 in {folder} has the classes {', '.join(names)}, not the ones asked for")
    files = [folder / name for name in (TRAIN if split == "train" else VAL)]
    images, labels, file_of, offset = [], [], [], []
    for number, path in enumerate(files):
        batch = _unpickle(path)
        try:
            data, found = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch["labels"], dtype=np.int64)
        except KeyError as missing:
            raise UserError(f"{path} is not a CIFAR-10 batch (it has no {missing}); replace it with the original") \
                from None
        if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(found) != len(data):
            raise UserError(f"{path} holds {data.shape} pixels and {len(found)} labels, not CIFAR-10's rows of "
                            f"{3 * SIDE * SIDE}; replace it with the original")
        images.append(data)
        labels.append(found)
        file_of.append(np.full(len(data), number, np.int64))
        offset.append(np.arange(len(data), dtype=np.int64) * data.shape[1])
    labels = np.concatenate(labels)
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(names):
        raise UserError(f"CIFAR-10's labels in {folder} run outside its {len(names)} classes; replace the files")
    n = len(labels)
    pixels = torch.from_numpy(np.concatenate(images)).view(n, 3, SIDE, SIDE)
    return Split([str(path) for path in files], np.concatenate(file_of), np.concatenate(offset),
                 np.full(n, 3 * SIDE * SIDE, np.int64), labels, names,
                 np.append(np.arange(0, n, shard_size, dtype=np.int64), n), False,
                 f"CIFAR-10 python batches in {folder}", pixels)


def class_names(folder: Path) -> list[str]:
    names = _unpickle(folder / "batches.meta").get("label_names")
    if not isinstance(names, list) or not names:
        raise UserError(f"{folder / 'batches.meta'} lists no class names; replace it with the original")
    return [str(name) for name in names]


def _unpickle(path: Path) -> dict:
    """One of CIFAR-10's pickled dicts (latin1: they were written by Python 2, as torchvision reads them)."""
    try:
        with open(path, "rb") as f:
            found = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; CIFAR-10's python batches are data_batch_1..5, test_batch and "
                        f"batches.meta") from None
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err.__class__.__name__}); replace it with the original") from None
    if not isinstance(found, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch; replace it with the original")
    return found


def fetch(root: Path | None = None) -> Path:
    """CIFAR-10's batches in ``root`` (default: the user cache), downloaded and MD5-checked by torchvision when
    absent (170 MB, once); returns the batches' folder."""
    from torchvision.datasets import CIFAR10

    root = Path(root) if root is not None else cache_dir() / "cifar10"
    if not holds(root, "train"):
        try:
            CIFAR10(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:  # no network, a bad archive
            raise UserError(f"cannot download CIFAR-10 into {root} ({err}); put cifar-10-python.tar.gz's "
                            f"{FOLDER}/ there, or pass its folder") from None
    return batches_folder(root)


def official(folder: Path) -> bool:
    """Whether every batch file is the one torchvision publishes (its MD5s): the original pixels."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    return all(check_integrity(str(folder / name), md5) for name, md5 in [*CIFAR10.train_list, *CIFAR10.test_list])
