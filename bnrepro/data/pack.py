"""``bnrepro pack``: class folders or idx files written as WebDataset tar shards, in one fixed random order.

Packing is how a data set stored one file per image becomes a few large sequential files, as the paper's training
read ImageNet; the shards' stored order is then what Sec. 4.2.1's "within-shard shuffling" is about.
"""

from __future__ import annotations

import fnmatch
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.io import encode_png

from bnrepro.data import mnist
from bnrepro.data.idx import check_headers
from bnrepro.data.sources import folders, idx
from bnrepro.data.split import IMAGE_SUFFIXES
from bnrepro.errors import UserError
from bnrepro.runs import TEMPORARY, atomic_write

Example = tuple[Callable[[], bytes], str, int]  # (read its encoded bytes, file extension, label)


def pack(source: Path, dest: Path, shard_size: int = 1000, seed: int = 0) -> dict[str, int]:
    """Write ``source`` (class folders, or an MNIST/Fashion-MNIST ``raw`` folder of idx .gz files) as WebDataset
    tar shards ``dest/{train,val}-NNNNNN.tar`` plus ``dest/classes.txt``.

    Examples are packed in one fixed random order (``seed``), so each shard holds a mix of classes, as a
    data set's shards would; image bytes are stored as they are (idx images become PNGs).
    ``dest`` is a new or empty folder, or one holding an earlier packing alone, which is replaced whole once the new
    shards are all written (a split the source lacks keeps no old shards, which a run would read as this data's);
    until then, and if packing fails, ``dest`` stays as it was. Returns the number of examples written per split.
    """
    source, dest = Path(source), Path(dest)
    if shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, not {shard_size}")
    if not (source / "train").is_dir() and not idx.holds(source, "train"):
        raise UserError(f"{source} holds neither train/<class>/ folders nor MNIST-format idx files; nothing to pack")
    existed = dest.exists()
    staging = _staging(dest)
    try:
        classes, items = _examples(source)
        counts = {name: _write_split(staging, name, examples, shard_size, seed) for name, examples in items.items()}
        atomic_write(staging / "classes.txt", "\n".join(classes) + "\n")
        _replace_packing(dest, staging)
    except BaseException as err:
        shutil.rmtree(staging if existed else dest, ignore_errors=True)  # a folder made here goes again
        if isinstance(err, OSError):
            raise UserError(f"cannot write shards to {dest} ({err.strerror})") from None
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return counts


def _examples(source: Path) -> tuple[list[str], dict[str, list[Example]]]:
    """The class names and, per split, every example of ``source`` (read lazily), in a fixed order."""

    if idx.holds(source, "train"):
        check_headers(idx.files(source))
        arrays = mnist.read_folder(source, cache=False)  # packing imports torchvision anyway
        splits = {"train": (arrays.train_images, arrays.train_labels), "val": (arrays.test_images, arrays.test_labels)}
        return idx.class_names(source), {
            name: [(lambda im=im: encode_png(im[None]).numpy().tobytes(), "png", int(label))
                   for im, label in zip(images, labels)] for name, (images, labels) in splits.items()}
    classes = folders.class_names(source / "train")
    items = {}
    for name in ("train", "val"):
        if (source / name).is_dir():
            split = folders.open_folder(source / name, classes)
            listed = sorted(zip(split.files, split.labels.tolist()),  # by class, then file name: the seed
                            key=lambda item: (Path(item[0]).parent.name, Path(item[0]).name))  # order's input
            items[name] = [(lambda path=path: Path(path).read_bytes(), IMAGE_SUFFIXES[Path(path).suffix.lower()],
                            int(label)) for path, label in listed]
    return classes, items


def _write_split(folder: Path, name: str, examples: list[Example], shard_size: int, seed: int) -> int:
    """``examples`` as shards ``folder/name-NNNNNN.tar`` in the seed's one fixed order; returns how many."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    for number, first in enumerate(range(0, len(order), shard_size)):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in order[first:first + shard_size]:
                read, ext, label = examples[i]
                key = f"{name}{i:08d}"
                _add(tar, f"{key}.{ext}", read())
                _add(tar, f"{key}.cls", str(label).encode())
        atomic_write(folder / f"{name}-{number:06d}.tar", buffer.getvalue())
    return len(order)


def _of_a_packing(name: str) -> bool:
    """Whether a file named ``name`` is what ``pack`` writes into its destination (or leaves there when killed)."""
    return name == "classes.txt" or fnmatch.fnmatch(name, "train-*.tar") or fnmatch.fnmatch(name, "val-*.tar") \
        or name.startswith(STAGING) or (name.startswith(".") and name.endswith(TEMPORARY))


STAGING = ".packing-"  # where pack writes the new shards, inside the destination, until they are all there


def _staging(dest: Path) -> Path:
    """A private folder inside ``dest`` for the new shards; ``dest`` must be a folder pack may replace whole."""
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file; pack writes a folder of shards, give a new or empty folder")
    others = sorted(entry.name for entry in os.scandir(dest) if not _of_a_packing(entry.name)) if dest.is_dir() else []
    if others:
        raise UserError(f"{dest} holds files that no packing wrote ({', '.join(others[:3])}"
                        f"{', ...' if len(others) > 3 else ''}); pack into a new or empty folder")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=STAGING, dir=dest))
    except OSError as err:
        raise UserError(f"cannot write shards to {dest} ({err.strerror})") from None


def _replace_packing(dest: Path, staging: Path) -> None:
    """The earlier packing in ``dest`` (every split's shards) goes, the new one from ``staging`` takes its place."""
    for entry in list(dest.iterdir()):
        if entry != staging and _of_a_packing(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for entry in list(staging.iterdir()):
        os.replace(entry, dest / entry.name)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644  # mtime 0: the same data packs to the same bytes
    tar.addfile(info, io.BytesIO(data))


