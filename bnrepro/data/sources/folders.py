"""Class folders, ``root/<split>/<class>/<image files>`` (ImageNet as distributed, CIFAR-10 as JPEGs, ...).

ImageNet folders named by wnid get the standard 0..999 labels (sorted-wnid order), so a subset of the classes keeps
its real labels; any other class-folder data set numbers its classes in sorted order.

Class folders have shards too, virtual ones: their examples are stored in a fixed order, that of the SHA-256 of
each file's path ``<class>/<file name>`` relative to the split folder (pseudo-random, so classes mix, yet the same
on every machine and independent of any run seed), cut into ``shard_size`` consecutive examples. Both shuffling
orders (``bnrepro.data.order``) therefore mean for folders what they mean for ``bnrepro pack``'s tar shards.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np

from bnrepro.data.split import IMAGE_SUFFIXES, Split, path_key
from bnrepro.errors import UserError


def holds(root: Path, split: str) -> bool:
    return (root / split).is_dir()


def open_split(root: Path, split: str, classes: list[str] | None, shard_size: int) -> Split:
    """The images of ``root/split/<class>/``, in path-hash order, in virtual shards of ``shard_size`` examples."""
    folder = root / split
    return open_folder(folder, classes or class_names(folder), shard_size)


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids in the standard label order (sorted wnids)."""
    text = resources.files("bnrepro.data").joinpath("imagenet_classes.txt").read_text()
    return [line.split("\t")[1] for line in text.splitlines() if line.strip()]



def class_names(folder: Path) -> list[str]:
    """Labels of a class-folder split: all 1000 wnids if every folder is one, else the sorted folder names."""
    found = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not found:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class>/<image files>")
    wnids = imagenet_wnids()
    return wnids if set(found) <= set(wnids) else found


def open_folder(folder: Path, classes: list[str], shard_size: int = 1000) -> Split:
    """The images of ``folder/<class>/``, in path-hash order, in virtual shards of ``shard_size`` examples."""
    index = {name: i for i, name in enumerate(classes)}
    found = []  # (order key, path, label)
    for entry in os.scandir(folder):
        if not entry.is_dir():
            continue
        if entry.name not in index:
            raise UserError(f"class folder {entry.path} is not one of the training classes")
        for image in os.scandir(entry.path):
            if Path(image.name).suffix.lower() in IMAGE_SUFFIXES:
                relative = f"{entry.name}/{image.name}"
                found.append((path_key(relative), relative, image.path, index[entry.name]))
    if not found:
        raise UserError(f"no images (.jpeg/.jpg/.png/.webp/.gif) under {folder}/<class>/")
    found.sort()  # by hash; the relative path breaks (astronomically unlikely) ties
    n = len(found)
    starts = np.append(np.arange(0, n, shard_size, dtype=np.int64), n)
    return Split([path for _, _, path, _ in found], np.arange(n), np.zeros(n, np.int64), np.full(n, -1, np.int64),
                 np.array([label for *_, label in found], np.int64), classes, starts, False, str(folder))
