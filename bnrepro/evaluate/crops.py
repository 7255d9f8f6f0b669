"""Multi-crop views for Fig. 4: 1 crop, 10 crops, and GoogLeNet's 144 crops (Szegedy et al. 2014, Sec. 7).

1 crop is the trainer's own evaluation view: the shorter side to the crop size times the recipe's
``data.eval_resize``, then the centre, computed as the trainer computed it: for data it held resident, resampled in
float and never re-quantized (``augment.evaluation_view``, ``float_view``); for files, torchvision's uint8 resize
(``images.evaluation_transform``), which rounds to whole grey levels. 10 crops: the shorter side to 256 (for 224
crops), the centre and the 4 corners, and their mirrors.

144 crops of one image: resize it so the shorter side is 256, 288, 320 and 352; take the left, centre and
right squares of that side (top, centre, bottom for a portrait image); from each square the 4 corner and
the centre 224x224 crops plus the square itself resized to 224; and the mirror of each:
4 x 3 x 6 x 2 = 144. The numbers scale with the network's resolution (e.g. 64 px: shorter sides 73-101).

Every view is a ``Box`` in the coordinates of the resized image, so the geometry can be checked by hand
(tests/test_crops.py) and the crops are cut from tensors on whatever device holds the image. Views are not always
distinct: a square image's left, centre and right squares are one square, so its 144 crops are 48 views, each three
times (``distinct_views``); the average over the 144 weighs every view by how often it occurs, as GoogLeNet's does.
So the network need see each view only once: ``distinct_crops_of`` gives the distinct views and, for each of the
scheme's views, the row holding it; gathering the network's outputs by that index gives the outputs on all views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from bnrepro.data.augment import evaluation_view

SCHEMES = (1, 10, 144)
GOOGLENET_SCALES = (256, 288, 320, 352)  # shorter sides for 224-px crops


@dataclass(frozen=True)
class Box:
    """Resize the image so its shorter side is ``scale``; cut rows ``top:top+side`` and columns
    ``left:left+side``; resize that square to the crop size if it is larger; mirror it if ``mirror``."""

    scale: int
    top: int
    left: int
    side: int
    mirror: bool


def resized_shape(height: int, width: int, scale: int) -> tuple[int, int]:
    """The shape torchvision's ``resize(image, scale)`` gives: shorter side ``scale``, the other truncated."""
    if height <= width:
        return scale, int(scale * width / height)
    return int(scale * height / width), scale


def _centre(length: int, side: int) -> int:
    return int(round((length - side) / 2))  # as torchvision's center_crop


def boxes(height: int, width: int, crops: int, size: int = 224, resize: float = 256 / 224) -> list[Box]:
    """The views of an image of ``height`` x ``width`` for 1, 10 or 144 crops of ``size`` pixels.

    The single crop resizes the shorter side to ``round(size * resize)`` and takes the centre, exactly as the
    trainer's evaluation (``images.evaluation_transform(size, recipe.data.eval_resize)``); the 10 crops keep
    the usual 256 for 224 and the 144 GoogLeNet's scales, whatever ``resize`` is."""
    if crops not in SCHEMES:
        raise ValueError(f"crops must be one of {SCHEMES}, not {crops}")
    if crops in (1, 10):  # shorter side to resize x (1 crop) or 256/224 x (10) the crop, the centre and corners
        scale = round(size * (resize if crops == 1 else 256 / 224))
        h, w = resized_shape(height, width, scale)
        found = [Box(scale, _centre(h, size), _centre(w, size), size, False)]
        if crops == 1:
            return found
        found += [Box(scale, top, left, size, False) for top in (0, h - size) for left in (0, w - size)]
        return found + [Box(b.scale, b.top, b.left, b.side, True) for b in found]
    found = []
    for scale in (round(size * s / 224) for s in GOOGLENET_SCALES):
        h, w = resized_shape(height, width, scale)
        long_side = max(h, w)
        for offset in (0, _centre(long_side, scale), long_side - scale):  # left/centre/right or top/centre/bottom
            top, left = (0, offset) if h <= w else (offset, 0)
            inner = [(0, 0), (0, scale - size), (scale - size, 0), (scale - size, scale - size),
                     (_centre(scale, size), _centre(scale, size))]
            views = [(top + dt, left + dl, size) for dt, dl in inner] + [(top, left, scale)]
            found += [Box(scale, t, x, side, mirror) for mirror in (False, True) for t, x, side in views]
    return found


def distinct_boxes(height: int, width: int, crops: int, size: int = 224, resize: float = 256 / 224
                   ) -> tuple[list[Box], list[int]]:
    """The different ``boxes`` in the order they first occur, and for each of the scheme's boxes its place among
    them: boxes with the same scale, place, side and mirroring cut the same pixels, so each needs cutting (and the
    network running on it) once. Where all views differ (1 and 10 crops, most non-square images) the distinct
    boxes are ``boxes`` itself and the index 0, 1, 2, ..."""
    found: dict[Box, int] = {}
    index = [found.setdefault(box, len(found)) for box in boxes(height, width, crops, size, resize)]
    return list(found), index


def distinct_views(height: int, width: int, crops: int, size: int = 224, resize: float = 256 / 224) -> int:
    """How many of the ``crops`` views of a ``height`` x ``width`` image differ: boxes with the same scale, place,
    side and mirroring cut the same pixels, and different ones different pixels of any image that is not itself
    symmetric (tests/test_crops.py counts distinct crops of random images to check this)."""
    return len(distinct_boxes(height, width, crops, size, resize)[0])


def crops_of(image: Tensor, crops: int, size: int = 224, resize: float = 256 / 224, float_view: bool = False) -> Tensor:
    """All views of one uint8 image (3, H, W) as a batch (crops, 3, size, size), on the image's device, repeated
    views included; ``resize`` is the single crop's (see ``boxes``). With ``float_view`` the single crop is the
    resident trainer's float32 view in [0, 255] (``augment.evaluation_view``), not torchvision's uint8 one."""
    views, index = distinct_crops_of(image, crops, size, resize, float_view)
    return views[index]


def distinct_crops_of(image: Tensor, crops: int, size: int = 224, resize: float = 256 / 224,
                      float_view: bool = False) -> tuple[Tensor, Tensor]:
    """The distinct views of one image (as ``crops_of``, each once, in the order they first occur) and the index
    (crops,) of each of the scheme's views among them, on the image's device: ``views[index]`` is ``crops_of``, and
    a per-view result gathered by the index and averaged over the ``crops`` is its average over all views, each
    weighted by how often it occurs, without computing any view twice (a square image's 144 crops are 48 views)."""
    if crops == 1 and float_view:
        return evaluation_view(image[None], size, resize), torch.zeros(1, dtype=torch.long, device=image.device)
    distinct, index = distinct_boxes(image.shape[-2], image.shape[-1], crops, size, resize)
    resized: dict[int, Tensor] = {}
    cut: dict[tuple[int, int, int, int], Tensor] = {}  # a view and its mirror share one crop (and resize)
    out = []
    for box in distinct:
        if box.scale not in resized:
            resized[box.scale] = F.resize(image, [*resized_shape(image.shape[-2], image.shape[-1], box.scale)],
                                          antialias=True)
        key = (box.scale, box.top, box.left, box.side)
        if key not in cut:
            view = resized[box.scale][:, box.top:box.top + box.side, box.left:box.left + box.side]
            cut[key] = F.resize(view, [size, size], antialias=True) if box.side != size else view
        out.append(cut[key].flip(-1) if box.mirror else cut[key])
    return torch.stack(out), torch.tensor(index, dtype=torch.long, device=image.device)
