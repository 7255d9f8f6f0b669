"""Where an image data set lies on disk, whatever its format: one module per format, ``open_split`` the one door.

Each format module has ``holds(root, split)`` (whether ``root`` holds that split in its format) and
``open_split(root, split, classes, shard_size)`` (the split's ``Split``). Adding a format is one module and one
line in ``FORMATS``; everything downstream (resident data, the epoch order, the input pipeline) reads ``Split``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from bnrepro.data.resident import make_resident
from bnrepro.data.sources import cifar, folders, idx, shards
from bnrepro.data.split import Split
from bnrepro.errors import UserError

FORMATS = (shards, folders, idx, cifar)  # asked in this order: shards beside their source folders win
FETCHERS = {"cifar10": cifar.fetch}  # a profile's data set (recipe ``profiles.<p>.dataset``) bnrepro can download
IDENTITY_VERSION = "bnrepro data identity v1"


def open_split(root: Path, split: str, classes: list[str] | None = None, shard_size: int = 1000,
               resident: bool = False) -> Split:
    """``root/split/<class>/*`` (folders, in virtual shards of ``shard_size``), ``root/split-*.tar`` (shards
    written by ``bnrepro pack``) or ``root/*-idx?-ubyte[.gz]`` (MNIST-format idx files: "train" the train files,
    "val" the t10k ones; always resident). With ``resident`` a folder or tar split is held in memory decoded (see
    ``bnrepro.data.resident``) if its images allow it."""
    root = Path(root)
    if shard_size < 1:
        raise UserError(f"shard_size must be at least 1, not {shard_size}")
    source = next((form for form in FORMATS if form.holds(root, split)), None)
    if source is None:
        raise UserError(f"no '{split}' data in {root}: expected {root}/{split}/<class>/<images>, "
                        f"{root}/{split}-*.tar shards (see `bnrepro pack`) or MNIST-format idx files")
    found = source.open_split(root, split, classes, shard_size)
    return make_resident(found) if resident else found


def fetch(dataset: str) -> Path:
    """The folder of a profile's ``dataset`` when no --dataset-dir is given: downloaded once into the user cache and
    checked where bnrepro knows its official copy (CIFAR-10, the cpu profile's); else a clear request for the folder
    (ImageNet cannot be downloaded without an account)."""
    if dataset not in FETCHERS:
        raise UserError(f"give --dataset-dir DIR: the profile's data set ({dataset}) is not one bnrepro downloads "
                        f"(it fetches {', '.join(FETCHERS)})")
    return FETCHERS[dataset]()


def data_identity(dataset_dir: Path, train: Split | None = None, val: Split | None = None) -> dict[str, object]:
    """What a run trained and was evaluated on, cheap enough to compute for every planned run: ``name`` (the data
    set as the reports name it, never a path), ``format`` (``idx``, ``cifar``, ``shards`` or ``folders``), ``classes``,
    ``train_examples``, ``val_examples`` and ``digest`` (SHA-256, hex).

    The digest covers different things per format, so that it costs seconds, not a read of the data:

    - idx files (MNIST, Fashion-MNIST, ~30 MB) and CIFAR-10's python batches (~180 MB): the files' names and
      bytes, all of them;
    - tar shards and class folders (ImageNet: ~1.3 M files, 150 GB): the sorted paths relative to
      ``dataset_dir`` and the sizes of every file the two splits read, plus the class list, not their
      contents. An image rewritten in place with the same size keeps the digest; any file added, removed,
      renamed or resized changes it.

    Paths are relative, so the same data in another folder or on another machine has the same identity; the same
    images packed as shards, or idx files decompressed, do not (other files). ``train`` and ``val``: the splits
    when the caller has them open already (the trainer), which saves opening them again."""
    root = Path(dataset_dir)
    train = open_split(root, "train") if train is None else train
    val = open_split(root, "val", train.classes) if val is None else val
    digest = hashlib.sha256(f"{IDENTITY_VERSION}\0".encode())
    if train.packed or train.folders:
        form = "shards" if train.packed else "folders"
        digest.update((json.dumps(train.classes) + "\0").encode())
        listed = {os.path.relpath(path, root): os.path.getsize(path) for split in (train, val) for path in split.files}
        for relative, size in sorted(listed.items()):
            digest.update(f"{Path(relative).as_posix()}\0{size}\0".encode("utf-8", "surrogateescape"))
        name = f"{'tar shards' if train.packed else 'class folders'} '{root.resolve().name}'"
    else:  # a few files holding every example: their bytes
        form = "cifar" if cifar.holds(root, "train") else "idx"
        paths = [Path(p) for p in (*train.files, *val.files)] if form == "cifar" else idx.files(root)
        for path in paths:
            data = path.read_bytes()
            digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
        name = train.where.split(" in ", 1)[0]  # "Fashion-MNIST idx files", "CIFAR-10 python batches"
    return {"name": name, "format": form, "classes": list(train.classes), "train_examples": len(train),
            "val_examples": len(val), "digest": digest.hexdigest()}
