"""Resident data: a split decoded once into one uint8 tensor ``Split.pixels`` (N, C, H, W), held in memory.

Training then reads it without decoding and needs no worker processes; the pipeline augments it a mini-batch at a
time on the device. Idx folders always are resident (their source parses them so); ``make_resident`` makes a folder
or tar split of same-size images so, and keeps the tensor in the user cache while the files' bytes are unchanged.
Images gray in every channel (Fashion-MNIST packed as PNGs) keep one channel, C = 1, as the idx files have; any
colour image makes it C = 3. Either way ``Split.image(i)`` gives the RGB (3, H, W) that ``decode`` gives for the file.
A split that cannot be held (images of several sizes, an unreadable one, too large) is read from its files, and
``make_resident`` says why in one line: file reading is many times slower.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bnrepro.data.cache import cached
from bnrepro.data.split import Split, decode, path_key
from bnrepro.runs import cache_dir


def make_resident(split: Split, cache: bool = True) -> Split:
    """``split`` with every image decoded once into ``pixels``, or ``split`` itself, read from its files, if that
    cannot be: images of different sizes, an unreadable one, or more pixels than a quarter of this machine's
    memory (then one line says which). With ``cache`` the tensor is kept in the user cache (``resident/``, one entry
    per split location) and loaded from there, without decoding, while a SHA-256 over the split's files' bytes and
    the examples' addresses is unchanged."""
    if split.pixels is not None or not len(split):
        return split
    try:
        pixels, why = _held(split, cache)
    except OSError as err:  # a file went missing or unreadable
        pixels, why = None, f"a file could not be read ({err.strerror or err.__class__.__name__})"
    if pixels is None:
        print(f"note: {split.where} is read from its files at every step, not held in memory decoded: {why}",
              file=sys.stderr, flush=True)
        return split
    return replace(split, pixels=pixels)


def _held(split: Split, cache: bool) -> tuple[Tensor | None, str]:
    """The split's decoded pixels, or ``None`` and why not."""
    budget = memory_budget()
    if (encoded := encoded_bytes(split)) > budget:  # decoded images are larger still: do not even hash them
        return None, f"its {encoded / 2**30:.1f} GiB of encoded images exceed a quarter of this machine's memory"
    if not cache:
        return decode_all(split, budget)
    entry = cache_dir() / "resident" / f"{path_key(chr(0).join(map(os.path.abspath, split.files)))[:16]}.pt"
    saved = cached(entry, split_digest(split), lambda: _entry(decode_all(split, budget)),
                   accept=lambda saved: _fits(split, saved.get("pixels")) or isinstance(saved.get("why"), str))
    return saved.get("pixels"), saved.get("why", "")


def _entry(decoded: tuple[Tensor | None, str]) -> dict[str, Any]:
    pixels, why = decoded
    return {"pixels": pixels} if pixels is not None else {"why": why}


def _fits(split: Split, pixels: object) -> bool:
    return isinstance(pixels, Tensor) and pixels.dtype == torch.uint8 and pixels.ndim == 4 \
        and len(pixels) == len(split) and pixels.shape[1] in (1, 3)


def memory_budget() -> int:
    """What one process may hold resident: a quarter of this machine's memory, shared by the processes ``torchrun``
    starts on it (``LOCAL_WORLD_SIZE``); 8 GiB where the memory cannot be read."""
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4 // processes
    except (AttributeError, OSError, ValueError):
        return (8 << 30) // processes


def encoded_bytes(split: Split) -> int:
    whole = {int(number) for number in split.file_of[split.size < 0]}
    return int(split.size[split.size >= 0].sum()) + sum(os.path.getsize(split.files[number]) for number in whole)


def split_digest(split: Split) -> str:
    """SHA-256 over each of the split's files' path, size and modification time (nanoseconds), and the examples'
    addresses: what the cached pixels were decoded from. Reading the files' bytes instead cost a pass over the whole
    split at every start, in every replica (ImageNet's validation set: 6.4 GB), to find an entry unchanged; the cache
    is this machine's own, where a file rewritten keeps neither its time nor, mostly, its size."""
    digest = hashlib.sha256(b"bnrepro resident v2\0")
    for path in split.files:
        stat = os.stat(path)
        line = f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
        digest.update(line.encode("utf-8", "surrogateescape"))
    for array in (split.file_of, split.offset, split.size):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def decode_all(split: Split, budget: int) -> tuple[Tensor | None, str]:
    """Every image of ``split`` decoded into one (N, C, H, W) tensor, each file read once; or ``None`` at the first
    unreadable image, or one of another size, and why. C stays 1 while every image is gray in all three channels."""
    pixels, current, data = None, -1, b""
    for i in range(len(split)):
        number = int(split.file_of[i])
        if number != current:
            current, data = number, Path(split.files[number]).read_bytes()
        start, size = int(split.offset[i]), int(split.size[i])
        chunk = data[start:] if size < 0 else data[start:start + size]
        image = decode(torch.frombuffer(bytearray(chunk), dtype=torch.uint8)) if chunk else None
        if image is None:
            return None, f"an image is unreadable ({split.files[number]})"
        if pixels is None:
            if len(split) * image.numel() > budget:
                return None, f"{len(split):,} decoded images exceed a quarter of this machine's memory"
            pixels = torch.empty((len(split), 1, *image.shape[1:]), dtype=torch.uint8)
        if image.shape[1:] != pixels.shape[2:]:
            return None, f"its images differ in size ({tuple(image.shape[1:])} and {tuple(pixels.shape[2:])})"
        if pixels.shape[1] == 1 and not (torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])):
            pixels = pixels.repeat(1, 3, 1, 1)  # the first colour image: every image keeps all three channels
        pixels[i] = image[:pixels.shape[1]]
    return pixels, ""


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
