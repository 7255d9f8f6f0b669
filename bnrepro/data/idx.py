"""MNIST-format idx files: their headers, checked before any parser reads them.

torchvision's parser answers a header it does not expect with an empty ``AssertionError`` (a type code above 0x0e)
or a bare ``KeyError`` (0x0a), neither of which names the file or says what is wrong; this module is light (no
torch, no torchvision), so any reader of idx files can call it first.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from pathlib import Path

from bnrepro.errors import UserError

UNSIGNED_BYTE = 0x08  # the type code of MNIST's and Fashion-MNIST's images and labels


def check_headers(paths: Iterable[Path]) -> None:
    """Each file (``.gz`` or not) must start as MNIST-format files do: two zero bytes, the type code of unsigned
    bytes, and 3 dimensions for images (``*-images-*``) or 1 for labels. A missing, corrupt or truncated file is
    left to the parser, which says which."""
    for path in map(Path, paths):
        dims = 3 if "-images-" in path.name else 1
        try:
            with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
                head = f.read(4)
        except (OSError, EOFError, zlib.error):
            continue
        if len(head) < 4 or head[:2] != b"\0\0":
            raise UserError(f"{path} does not start with an idx header; replace it with the original")
        if head[2] != UNSIGNED_BYTE or head[3] != dims:
            raise UserError(f"{path} holds idx type code 0x{head[2]:02x} in {head[3]} dimension(s), where "
                            f"MNIST-format {'images' if dims == 3 else 'labels'} are unsigned bytes (0x08) in {dims}; "
                            f"replace it with the original")
