"""One split of an image data set: where each example lies, its label, and how to read and decode it.

Every example of a split has an address (an image file, a member of a tar shard, or a record of an idx file) and a
label. The sources (``bnrepro.data.sources``) turn a location on disk into a ``Split``; everything after them
(holding it resident, the epoch order, the input pipeline) works on ``Split`` alone, whatever the format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, encode_png
from torchvision.transforms import v2

IMAGE_SUFFIXES = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp", ".gif": "gif"}


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


def path_key(relative: str) -> str:
    """Where an example of class folders lies in the stored order: the SHA-256 of ``<class>/<file name>``."""
    return hashlib.sha256(relative.encode("utf-8", "surrogateescape")).hexdigest()


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
