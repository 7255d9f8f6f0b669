"""Image classification data for the ImageNet recipes: class folders, or WebDataset tar shards.

Every example of a split has an address (an image file, or a member of a tar shard) and a label. ImageNet
folders named by wnid get the standard 0..999 labels (sorted-wnid order), so a subset of the classes keeps
its real labels; any other class-folder data set numbers its classes in sorted order.

The training stream is a pure function of (seed, position): the order of epoch e comes from (seed, e), and
the example at stream position p is augmented with its own seed. Step k's mini-batch is therefore the same
whether or not the run was interrupted and resumed, and DDP replicas take disjoint slices of each global
batch. The order is where Sec. 4.2.1's shuffling lives:

- ``shards``: the shard order is shuffled, examples inside a shard come in stored order, so the same
  examples keep meeting in the same mini-batches, epoch after epoch;
- ``within_shard``: examples are also shuffled inside and across a buffer of consecutive shards
  (the paper's change 6, "within-shard shuffling");
- ``full``: a fresh permutation of all examples every epoch (only for callers that ask for it).

Class folders have shards too, virtual ones: their examples are stored in a fixed order, that of the
SHA-256 of each file's path ``<class>/<file name>`` relative to the split folder (pseudo-random, so classes
mix, yet the same on every machine and independent of any run seed), cut into ``shard_size`` consecutive
examples. Both shuffling orders therefore mean for folders what they mean for ``bnrepro pack``'s tar shards.
A folder of MNIST-format idx files (MNIST, Fashion-MNIST) is a third source: its examples keep the files'
stored order (the data set as distributed), in virtual shards of ``shard_size`` consecutive examples.

Data that fits in memory can be resident: decoded once into one uint8 tensor ``Split.pixels`` (N, C, H, W),
so training reads it without decoding and needs no worker processes. Idx folders always are; ``resident()``
(or ``open_split(..., resident=True)``) makes a folder or tar split of same-size images so, and keeps the
tensor in the user cache while the files' bytes are unchanged. Images gray in every channel (Fashion-MNIST
packed as PNGs) keep one channel, C = 1, as the idx files have; any colour image makes it C = 3. Either way
``Split.image(i)`` gives the RGB (3, H, W) that ``decode`` gives for the file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_png
from torchvision.transforms import v2

from bnrepro.data import idx
from bnrepro.errors import UserError
from bnrepro.runs import TEMPORARY, atomic_write, cache_dir

IMAGE_SUFFIXES = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp", ".gif": "gif"}
Order = Literal["full", "shards", "within_shard"]


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 wnids in the standard label order (sorted wnids)."""
    text = resources.files("bnrepro.data").joinpath("imagenet_classes.txt").read_text()
    return [line.split("\t")[1] for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Split:
    """Where each example of one split lies: ``files[file_of[i]]`` from byte ``offset[i]``, ``size[i]`` bytes
    (-1: the whole file). ``shard_starts`` bounds the shards' example ranges: tar shards, or a folder's virtual
    shards; ``packed``: the examples lie in tar shards (else they are class-folder image files, or idx records).
    ``pixels``: when set, the split is resident: uint8 (N, C, H, W), C = 1 (gray) or 3, ``pixels[i]`` is example
    ``i``, and every example is read from it (an idx record's address is its byte range in the uncompressed
    images file, where the bytes are raw pixels, not an encoded image)."""

    files: list[str]
    file_of: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    labels: np.ndarray
    classes: list[str]
    shard_starts: np.ndarray
    packed: bool
    where: str
    pixels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        """Example ``i`` encoded: its file's bytes, or for a resident split a (lossless) PNG of ``pixels[i]``."""
        if self.pixels is not None:
            return encode_png(self.pixels[i]).numpy().tobytes()
        with open(self.files[self.file_of[i]], "rb") as f:
            f.seek(int(self.offset[i]))
            return f.read(int(self.size[i]))

    def image(self, i: int) -> Tensor | None:
        """Example ``i`` as ``decode`` gives it, uint8 RGB (3, H, W): a copy of ``pixels[i]`` (one gray channel
        repeated) when resident, else decoded from its file; ``None`` if unreadable."""
        if self.pixels is not None:
            return self.pixels[i].expand(3, -1, -1).clone()
        try:
            return decode(torch.frombuffer(bytearray(self.read(i)), dtype=torch.uint8))
        except (OSError, ValueError):  # unreadable, or empty (frombuffer refuses zero bytes)
            return None

    def first(self, n: int) -> Split:
        """The split's first ``n`` examples (in its stored order), e.g. a validation subset."""
        if n >= len(self):
            return self
        starts = self.shard_starts
        starts = np.append(starts[starts < n], n)
        return replace(self, file_of=self.file_of[:n], offset=self.offset[:n], size=self.size[:n],
                       labels=self.labels[:n], shard_starts=starts, where=f"{self.where}, {n:,} images (first)",
                       pixels=None if self.pixels is None else self.pixels[:n])

    @property
    def folders(self) -> bool:
        """Class folders: one whole file per example, stored in path-hash order in virtual shards."""
        return not self.packed and len(self.size) > 0 and int(self.size[0]) == -1

    def name(self, i: int) -> str:
        where = self.files[self.file_of[i]]
        return f"{where}@{self.offset[i]}" if self.size[i] >= 0 else where  # a part of the file, or all of it


def class_names(folder: Path) -> list[str]:
    """Labels of a class-folder split: all 1000 wnids if every folder is one, else the sorted folder names."""
    found = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not found:
        raise UserError(f"{folder} has no class folders; expected {folder}/<class>/<image files>")
    wnids = imagenet_wnids()
    return wnids if set(found) <= set(wnids) else found


def open_split(root: Path, split: str, classes: list[str] | None = None, shard_size: int = 1000,
               resident: bool = False) -> Split:
    """``root/split/<class>/*`` (folders, in virtual shards of ``shard_size``), ``root/split-*.tar`` (shards
    written by ``bnrepro pack``) or ``root/*-idx?-ubyte[.gz]`` (MNIST-format idx files: "train" the train files,
    "val" the t10k ones; always resident). With ``resident`` a folder or tar split is made resident (see
    ``resident()``) if its images allow it."""
    root = Path(root)
    if shard_size < 1:
        raise UserError(f"shard_size must be at least 1, not {shard_size}")
    shards = sorted(root.glob(f"{split}-*.tar"))
    if shards:
        found = _open_shards(root, shards)
    elif (root / split).is_dir():
        found = _open_folder(root / split, classes or class_names(root / split), shard_size)
    elif _is_idx_folder(root):
        return _open_idx(root, split, classes, shard_size)
    else:
        raise UserError(f"no '{split}' data in {root}: expected {root}/{split}/<class>/<images>, "
                        f"{root}/{split}-*.tar shards (see `bnrepro pack`) or MNIST-format idx files")
    return _resident(found) if resident else found


IDENTITY_VERSION = "bnrepro data identity v1"


def data_identity(dataset_dir: Path, train: Split | None = None, val: Split | None = None) -> dict[str, object]:
    """What a run trained and was evaluated on, cheap enough to compute for every planned run: ``name`` (the data
    set as the reports name it, never a path), ``format`` (``idx``, ``shards`` or ``folders``), ``classes``,
    ``train_examples``, ``val_examples`` and ``digest`` (SHA-256, hex).

    The digest covers different things per format, so that it costs seconds, not a read of the data:

    - idx files (MNIST, Fashion-MNIST, ~30 MB): the four files' names and bytes, all of them;
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
    else:
        form = "idx"
        for path in idx_files(root):
            data = path.read_bytes()
            digest.update(f"{path.name}\0{len(data)}\0".encode() + data)
        name = train.where.split(" in ", 1)[0]  # "Fashion-MNIST idx files"
    return {"name": name, "format": form, "classes": list(train.classes), "train_examples": len(train),
            "val_examples": len(val), "digest": digest.hexdigest()}


def idx_files(folder: Path) -> list[Path]:
    """The four idx files an idx folder is read from (each packed, ``.gz``, where that file exists)."""
    from bnrepro.data import mnist

    return [folder / name if (folder / name).is_file() else folder / name.removesuffix(".gz") for name in mnist.FILES]


def path_key(relative: str) -> str:
    """Where a class-folder example lies in the stored order: the SHA-256 of ``<class>/<file name>``."""
    return hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()


def _open_folder(folder: Path, classes: list[str], shard_size: int = 1000) -> Split:
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


def _open_shards(root: Path, shards: list[Path]) -> Split:
    """Index WebDataset shards: members ``<key>.<image ext>`` and ``<key>.cls`` (the label), in stored order."""
    classes_file = root / "classes.txt"
    if not classes_file.is_file():
        raise UserError(f"{classes_file} is missing: shards need it for their class names (`bnrepro pack` writes it)")
    classes = [line for line in classes_file.read_text().splitlines() if line.strip()]
    file_of, offset, size, labels, starts = [], [], [], [], [0]
    for number, shard in enumerate(shards):
        images, found = _index_shard(shard)
        for key, (start, length) in images.items():
            file_of.append(number)
            offset.append(start)
            size.append(length)
            labels.append(found[key])
        starts.append(len(labels))
    if not labels:
        raise UserError(f"the shards in {root} hold no <key>.<image> + <key>.cls pairs")
    if max(labels) >= len(classes):
        raise UserError(f"shards in {root} have label {max(labels)} but classes.txt lists {len(classes)} classes")
    return Split([str(s) for s in shards], np.array(file_of), np.array(offset, np.int64), np.array(size, np.int64),
                 np.array(labels, np.int64), classes, np.array(starts, np.int64), True,
                 f"{len(shards)} shards in {root}")


def _index_shard(shard: Path) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """One shard's images (key -> byte offset and size) and labels (key -> class number), every example whole.

    Python's tar reader stops without a word at a damaged member header or where a file is cut short, so a
    scrambled or truncated shard would lose its later examples in silence (a run trained on 22 of 32 images and
    counted none skipped). So a shard must end as tar files do, with zero blocks after its last member; its members
    must lie inside the file; and every image must have its label and every label its image."""
    try:
        images, found = {}, {}
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "cls":
                    found[key] = int(tar.extractfile(member).read())
                elif f".{ext.lower()}" in IMAGE_SUFFIXES:
                    images[key] = (member.offset_data, member.size)
            end = tar.offset  # where reading stopped: the end-of-archive blocks, or what could not be read
    except (OSError, tarfile.TarError, ValueError) as err:
        detail = f": {err}" if str(err) else ""
        raise UserError(f"shard {shard} is unreadable ({err.__class__.__name__}{detail}); pack it again") from None
    why = _damage(shard, end, max((start + length for start, length in images.values()), default=0))
    unpaired = len(images.keys() ^ found.keys())
    if why is None and unpaired:
        why = f"{unpaired} of its examples lack their image or their .cls label"
    if why is not None:
        raise UserError(f"shard {shard} is damaged: {why}; pack it again")
    return images, found


def _damage(shard: Path, end: int, last_byte: int) -> str | None:
    """What is wrong with the bytes of ``shard`` from ``end`` (where its tar reader stopped) on, if anything."""
    size = os.path.getsize(shard)
    if last_byte > size or end + 512 > size:
        return f"it is cut short ({size:,} bytes, no end-of-archive block after byte {min(end, size):,})"
    with open(shard, "rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return f"the member at byte {end:,} has a damaged header (the examples from there on would be lost)"
    return None


def _is_idx_folder(folder: Path) -> bool:
    return any((folder / f"train-labels-idx1-ubyte{ext}").is_file() for ext in (".gz", ""))


def _open_idx(folder: Path, split: str, classes: list[str] | None, shard_size: int) -> Split:
    """MNIST-format idx files (parsed by ``mnist.read_folder``, through its cache), resident, in stored order."""
    from bnrepro.data import mnist

    if split not in ("train", "val"):
        raise UserError(f"the idx files in {folder} hold the splits 'train' and 'val' (the t10k files), not '{split}'")
    idx.check_headers(idx_files(folder))
    arrays = mnist.read_folder(folder)
    images, labels = (arrays.train_images, arrays.train_labels) if split == "train" else \
        (arrays.test_images, arrays.test_labels)
    names = _idx_class_names(folder)
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


# --- resident data ---------------------------------------------------------------------------------------


def synthetic(resolution: int, classes: int = 1000, train: int = 1024, val: int = 256) -> tuple[Split, Split]:
    """Random resident RGB images of ``resolution`` (``bnrepro imagenet --synthetic``): to time the training step
    alone, on any device, before a data set is fetched."""
    generator = torch.Generator().manual_seed(0)
    names = [f"class{c:04d}" for c in range(classes)]

    def split(n: int, name: str) -> Split:
        pixels = torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, classes, (n,), generator=generator).numpy()
        zeros = np.zeros(n, np.int64)
        return Split([name], zeros, zeros, zeros, labels, names, np.append(np.arange(0, n, 1000), n), False,
                     f"{n:,} synthetic {resolution}x{resolution} images", pixels)

    return split(train, "synthetic-train"), split(val, "synthetic-val")


def resident(split: Split, cache: bool = True) -> Split:
    """``split`` with every image decoded once into ``pixels`` (see the module docstring), or ``split`` itself,
    not resident, if that cannot be: images of different sizes, an unreadable one, or more pixels than a quarter
    of this machine's memory. With ``cache`` the tensor is kept in the user cache (``resident/``, one entry per
    split location) and loaded from there, without decoding, while a SHA-256 over the split's files' bytes and
    the examples' addresses is unchanged."""
    from bnrepro.data import mnist

    if split.pixels is not None or not len(split):
        return split
    try:
        if _encoded_bytes(split) > _memory_budget():  # decoded images are larger still: do not even hash them
            return split
        if not cache:
            pixels = _decode_all(split)
        else:
            entry = cache_dir() / "resident" / f"{path_key(chr(0).join(map(os.path.abspath, split.files)))[:16]}.pt"
            saved = mnist.cached(entry, _split_digest(split), lambda: _made(_decode_all(split)),
                                 accept=lambda saved: _fits(split, saved.get("pixels")))
            pixels = None if saved is None else saved["pixels"]
    except OSError:  # a file went missing or unreadable
        return split
    return split if pixels is None else replace(split, pixels=pixels)


_resident = resident  # open_split's keyword of the same name hides it there


def _made(pixels: Tensor | None) -> dict[str, Tensor] | None:
    return None if pixels is None else {"pixels": pixels}


def _fits(split: Split, pixels: object) -> bool:
    return isinstance(pixels, Tensor) and pixels.dtype == torch.uint8 and pixels.ndim == 4 \
        and len(pixels) == len(split) and pixels.shape[1] in (1, 3)


def _memory_budget() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, OSError, ValueError):
        return 8 << 30


def _encoded_bytes(split: Split) -> int:
    whole = {int(number) for number in split.file_of[split.size < 0]}
    return int(split.size[split.size >= 0].sum()) + sum(os.path.getsize(split.files[number]) for number in whole)


def _split_digest(split: Split) -> str:
    """SHA-256 over the bytes of the split's files (each with its length) and the examples' addresses."""
    digest = hashlib.sha256(b"bnrepro resident v1\0")
    for path in split.files:
        with open(path, "rb") as f:
            digest.update(os.fstat(f.fileno()).st_size.to_bytes(8, "little"))
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    for array in (split.file_of, split.offset, split.size):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _decode_all(split: Split) -> Tensor | None:
    """Every image of ``split`` decoded into one (N, C, H, W) tensor, each file read once; ``None`` at the first
    unreadable image, or one of another size. C stays 1 while every image is gray in all three channels."""
    pixels, budget, current, data = None, _memory_budget(), -1, b""
    for i in range(len(split)):
        number = int(split.file_of[i])
        if number != current:
            current, data = number, Path(split.files[number]).read_bytes()
        start, size = int(split.offset[i]), int(split.size[i])
        chunk = data[start:] if size < 0 else data[start:start + size]
        image = decode(torch.frombuffer(bytearray(chunk), dtype=torch.uint8)) if chunk else None
        if image is None:
            return None
        if pixels is None:
            if len(split) * image.numel() > budget:
                return None
            pixels = torch.empty((len(split), 1, *image.shape[1:]), dtype=torch.uint8)
        if image.shape[1:] != pixels.shape[2:]:
            return None
        if pixels.shape[1] == 1 and not (torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])):
            pixels = pixels.repeat(1, 3, 1, 1)  # the first colour image: every image keeps all three channels
        pixels[i] = image[:pixels.shape[1]]
    return pixels


# --- packing ---------------------------------------------------------------------------------------------


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
    if not (source / "train").is_dir() and not _is_idx_folder(source):
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
    from bnrepro.data import mnist

    if _is_idx_folder(source):
        idx.check_headers(idx_files(source))
        arrays = mnist.read_folder(source, cache=False)  # packing imports torchvision anyway
        splits = {"train": (arrays.train_images, arrays.train_labels), "val": (arrays.test_images, arrays.test_labels)}
        return _idx_class_names(source), {
            name: [(lambda im=im: encode_png(im[None]).numpy().tobytes(), "png", int(label))
                   for im, label in zip(images, labels)] for name, (images, labels) in splits.items()}
    classes = class_names(source / "train")
    items = {}
    for name in ("train", "val"):
        if (source / name).is_dir():
            split = _open_folder(source / name, classes)
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


def _idx_class_names(source: Path) -> list[str]:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import check_integrity

    name, md5 = FashionMNIST.resources[1]  # the train labels tell the two data sets apart
    fashion = check_integrity(str(source / name), md5)
    return [c.replace(" ", "_").replace("/", "-") for c in FashionMNIST.classes] if fashion \
        else [str(digit) for digit in range(10)]


# --- transforms ------------------------------------------------------------------------------------------


def is_jpeg(data: Tensor) -> bool:
    return len(data) > 2 and data[:2].tolist() == [0xFF, 0xD8]


def decode(data: Tensor) -> Tensor | None:
    """Encoded bytes -> uint8 RGB (3, H, W) on the CPU; ``None`` if unreadable. Grayscale comes back as RGB,
    an animated image as its first frame, a 16-bit image scaled to 8 bits."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    if image.ndim == 4:
        image = image[0]
    return image if image.dtype == torch.uint8 else v2.functional.to_dtype(image, torch.uint8, scale=True)


def decode_jpegs_on(device: torch.device, encoded: list[Tensor]) -> list[Tensor | None]:
    """Many JPEGs (CPU byte tensors) in one call on the GPU (nvJPEG); if the batch fails, image by image, and
    an image the GPU decoder rejects (e.g. CMYK) is decoded on the CPU, so only unreadable files are lost."""
    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        found: list[Tensor | None] = []
        for data in encoded:
            try:
                found.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                image = decode(data)
                found.append(None if image is None else image.to(device))
        return found


def training_transform(resolution: int, min_area: float, aspect: tuple[float, float], flip: bool,
                       photometric: dict[str, float]) -> v2.Compose:
    """GoogLeNet-style random-size crop, flips and colour jitter (strengths from the recipe)."""
    steps = [v2.RandomResizedCrop(resolution, scale=(min_area, 1.0), ratio=aspect, antialias=True)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ColorJitter(**photometric))
    return v2.Compose(steps)


def evaluation_transform(resolution: int, resize: float) -> v2.Compose:
    """Single centre crop: shorter side to ``resolution * resize``, then the central square."""
    return v2.Compose([v2.Resize(round(resolution * resize), antialias=True), v2.CenterCrop(resolution)])


def augment(image: Tensor, transform: Callable[[Tensor], Tensor], seed: int) -> Tensor:
    """Transform one image with its own random seed, so it is the same on every run, on any device."""
    with torch.random.fork_rng(devices=[]):  # transforms v2 draw their parameters from the CPU generator
        torch.manual_seed(seed)
        return transform(image)


def prepare(data: Tensor, transform: Callable[[Tensor], Tensor], seed: int) -> Tensor | None:
    """Decode (CPU) and transform one example; ``None`` if it is unreadable."""
    image = decode(data)
    return None if image is None else augment(image, transform, seed)


# --- loading ---------------------------------------------------------------------------------------------


class Examples(Dataset):
    """Item ``(position, index)`` -> ``(image, label, position)``, decoded and transformed in the worker; an
    unreadable image gives ``None``. With ``jpegs_as_bytes`` a JPEG comes back still encoded (1-d uint8),
    for the main process to decode on the GPU. A resident split's images come from ``pixels`` as RGB
    (3, H, W), only transformed: cheap enough for the main process (``num_workers=0``)."""

    def __init__(self, split: Split, transform: Callable[[Tensor], Tensor], seed: int, jpegs_as_bytes: bool):
        self.split, self.transform, self.seed, self.jpegs_as_bytes = split, transform, seed, jpegs_as_bytes

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, int, int]:
        position, index = item
        label = int(self.split.labels[index])
        if self.split.pixels is not None:  # resident: nothing to read or decode
            return augment(self.split.image(index), self.transform, example_seed(self.seed, position)), label, position
        try:
            data = torch.frombuffer(bytearray(self.split.read(index)), dtype=torch.uint8)
        except (OSError, ValueError):  # unreadable, or empty (frombuffer refuses zero bytes)
            return None, label, position
        if self.jpegs_as_bytes and is_jpeg(data):
            return data, label, position
        return prepare(data, self.transform, example_seed(self.seed, position)), label, position


def example_seed(seed: int, position: int) -> int:
    return (seed << 40) + position  # positions stay below 2**40 (1e12 examples)


@dataclass
class Batch:
    images: list[Tensor] | Tensor  # stacked uint8 images, or a list mixing images and still-encoded JPEGs
    labels: Tensor
    positions: list[int]  # stream positions of the examples kept, for their augmentation seeds
    skipped: list[int]  # stream positions of unreadable examples (dropped from the batch)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True), so copies to the GPU can overlap."""
        pin = lambda t: t.pin_memory()  # noqa: E731
        pictures = pin(self.images) if isinstance(self.images, Tensor) else [pin(t) for t in self.images]
        return Batch(pictures, pin(self.labels), self.positions, self.skipped)


def collate(items: list[tuple[Tensor | None, int, int]]) -> Batch:
    kept = [item for item in items if item[0] is not None]
    skipped = [position for image, _, position in items if image is None]
    images = [image for image, _, _ in kept]
    if images and all(image.shape == images[0].shape and image.ndim == 3 for image in images):
        images = torch.stack(images)
    return Batch(images, torch.tensor([label for _, label, _ in kept], dtype=torch.long),
                 [position for _, _, position in kept], skipped)


def on_device(batch: Batch, transform: Callable[[Tensor], Tensor], seed: int, device: torch.device) -> Batch:
    """``batch`` with every image decoded, transformed and on ``device``: JPEGs the workers left encoded are
    decoded there in one call and augmented with their own seeds; images that fail move to ``skipped``."""
    if isinstance(batch.images, Tensor):  # the workers did everything
        return Batch(batch.images.to(device, non_blocking=True), batch.labels, batch.positions, batch.skipped)
    pictures: list[Tensor | None] = list(batch.images)
    encoded = [i for i, image in enumerate(pictures) if image.ndim == 1]
    if encoded:
        for i, image in zip(encoded, decode_jpegs_on(device, [pictures[i] for i in encoded])):
            pictures[i] = None if image is None else augment(image, transform, example_seed(seed, batch.positions[i]))
    kept = [i for i, image in enumerate(pictures) if image is not None]
    lost = [batch.positions[i] for i, image in enumerate(pictures) if image is None]
    return Batch([pictures[i].to(device, non_blocking=True) for i in kept], batch.labels[kept],
                 [batch.positions[i] for i in kept], batch.skipped + lost)


def epoch_order(split: Split, order: Order, seed: int, epoch: int, buffer_shards: int) -> np.ndarray:
    """The example indices of one training epoch, in the order they are seen (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if order == "full":
        return torch.randperm(len(split), generator=generator).numpy()
    starts = split.shard_starts
    shards = torch.randperm(len(starts) - 1, generator=generator).tolist()
    ranges = [np.arange(starts[s], starts[s + 1]) for s in shards]
    if order == "shards":
        return np.concatenate(ranges)
    groups = [np.concatenate(ranges[i:i + buffer_shards]) for i in range(0, len(ranges), buffer_shards)]
    return np.concatenate([group[torch.randperm(len(group), generator=generator).numpy()] for group in groups])


class TrainingStream(Sampler):
    """This replica's share of every global mini-batch from ``start_step`` on: step k covers stream positions
    ``[k*B*W, (k+1)*B*W)``, replica r takes the r-th slice of B, and position p is example
    ``epoch_order(p // N)[p % N]``."""

    def __init__(self, split: Split, order: Order, seed: int, batch_size: int, rank: int, world: int,
                 start_step: int, buffer_shards: int):
        self.split, self.order, self.seed, self.buffer_shards = split, order, seed, buffer_shards
        self.batch_size, self.rank, self.world, self.start_step = batch_size, rank, world, start_step
        self._orders: dict[int, np.ndarray] = {}

    def index(self, position: int) -> int:
        epoch, within = divmod(position, len(self.split))
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.split, self.order, self.seed, epoch, self.buffer_shards)}
        return int(self._orders[epoch][within])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = (step * self.world + self.rank) * self.batch_size
            yield [(p, self.index(p)) for p in range(first, first + self.batch_size)]
            step += 1


class EvaluationBatches(Sampler):
    """Every validation example exactly once across replicas (replica r takes r, r+W, ...), no padding."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int):
        self.mine = list(range(rank, size, world))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for first in range(0, len(self.mine), self.batch_size):
            yield [(i, i) for i in self.mine[first:first + self.batch_size]]
