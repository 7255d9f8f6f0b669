"""WebDataset tar shards written by ``bnrepro pack``: ``root/<split>-NNNNNN.tar`` and ``root/classes.txt``.

Each shard holds members ``<key>.<image ext>`` and ``<key>.cls`` (the label); examples keep their stored order.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from bnrepro.data.split import IMAGE_SUFFIXES, Split
from bnrepro.errors import UserError


def holds(root: Path, split: str) -> bool:
    return any(root.glob(f"{split}-*.tar"))


def open_split(root: Path, split: str, classes: list[str] | None, shard_size: int) -> Split:
    """Index ``root``'s shards of ``split`` (``classes`` and ``shard_size`` do not apply: the shards say both)."""
    return open_shards(root, sorted(root.glob(f"{split}-*.tar")))


def open_shards(root: Path, shards: list[Path]) -> Split:
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
