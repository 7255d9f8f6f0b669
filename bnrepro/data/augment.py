"""Batched training augmentation and evaluation crops, drawn from the same distributions as the per-example
torchvision pipeline of :mod:`bnrepro.data.images` (``training_transform`` / ``evaluation_transform``).

``images.training_transform`` augments one decoded image at a time on the CPU generator. When the images of a
data set are already in memory as one uint8 tensor (all the same size), a whole mini-batch can be augmented at
once on its own device instead. This module does that with the same distributions:

- the random-size crop of ``v2.RandomResizedCrop.make_params`` (10 attempts, then its central fallback),
- the horizontal flip of ``v2.RandomHorizontalFlip`` (probability 0.5),
- the colour jitter of ``v2.ColorJitter`` (uniform factors, the four ops in a uniformly random order, an op of
  strength 0 skipped) with torchvision's own brightness / contrast / saturation / hue formulas,
- the bilinear, antialiased resize of ``v2.functional.resize(..., antialias=True)``, exactly (see ``resample``).

The random numbers are not torch's: each example's draws come from a counter-based hash of its own seed
(``example_uniforms``), so they are the same on every device and in every batch. The same seed therefore gives
different crops here and in ``images.augment`` (which uses ``torch.manual_seed``); the distributions are equal.

Differences from torchvision on uint8 images, all rounding, none of distribution: torchvision's uint8 pipeline
quantizes after the resize (rounding) and after every jitter op (a cast, which truncates: on average ~0.5 grey
level down per op), and floors the grayscale image used by contrast and saturation. Here everything stays
float32 in [0, 255], is clamped to [0, 255] after each jitter op as torchvision clamps, and is never
re-quantized; these are exactly torchvision's formulas on float images in [0, 1], scaled by 255.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bnrepro.runs import to_device

# --- counter-based uniforms ------------------------------------------------------------------------------

_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's constants, as signed int64 (torch has no uint64 arithmetic)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finalizer, on int64 tensors (products wrap modulo 2**64, as uint64 ones would)."""
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    return z ^ _shift_right(z, 31)


def example_uniforms(seeds: Tensor, count: int) -> Tensor:
    """(n,) int64 seeds -> (n, count) float64 uniforms in [0, 1).

    Draw k of a seed is output k of a SplitMix64 stream whose state starts at splitmix64(seed): a counter-based
    hash done with int64 tensor ops (wrapping products, logical shifts as shifts plus masks). Each example's
    draws therefore depend on its own seed alone, not on the batch it is in, nor on the device, and a shorter
    ``count`` gives a prefix of a longer one. The top 53 bits make the float64, so every value is exact."""
    seeds = seeds.to(torch.int64).reshape(-1)
    key = _mix64(seeds + _signed(_GAMMA))
    steps = torch.arange(1, count + 1, dtype=torch.int64, device=seeds.device) * _signed(_GAMMA)
    bits = _mix64(key[:, None] + steps[None, :])
    return _shift_right(bits, 11).to(torch.float64) * 2.0 ** -53


# --- exact antialiased bilinear resampling ---------------------------------------------------------------


def _axis_weights(start: Tensor, length: Tensor, source: int, out: int, total: int | None = None,
                  offset: int = 0) -> Tensor:
    """(n, out, source) float32 weights of one axis of torch's antialiased bilinear resize
    (``interpolate(..., mode="bilinear", antialias=True, align_corners=False)``, which ``v2.Resize`` calls):
    pixels ``[start, start + length)`` of a ``source``-long axis resized to ``total`` samples (default ``out``),
    of which outputs ``offset .. offset + out - 1`` are kept (outputs outside ``[0, total)`` get zero weights,
    as a centre crop's zero padding). Per output: a triangle filter of half-width ``max(scale, 1)`` input
    pixels around its centre, ``scale = length / total``, normalised over the pixels inside the segment
    (torch's ``_upsample_bilinear2d_aa`` weights, in float64 here). For upscaling this is ordinary bilinear
    interpolation with half-pixel centres and edge clamping."""
    total = out if total is None else total
    device = start.device
    start, length = start.to(torch.float64)[:, None, None], length.to(torch.float64)[:, None, None]
    scale = length / total
    support_inverse = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    kept = torch.arange(offset, offset + out, dtype=torch.float64, device=device)[None, :, None]
    centre = scale * (kept + 0.5)
    pixel = torch.arange(source, dtype=torch.float64, device=device)[None, None, :] - start
    weights = (1.0 - (pixel + 0.5 - centre).abs() * support_inverse).clamp_(min=0.0)
    weights = weights * ((pixel >= 0) & (pixel < length))
    sums = weights.sum(-1, keepdim=True)
    weights = torch.where(sums > 0, weights / sums.clamp(min=1e-300), weights)
    weights = weights * ((kept >= 0) & (kept < total))
    return weights.to(torch.float32)


def _exact_dtype() -> torch.dtype:
    """Full float32 products for the resample whatever the caller set, without touching torch's global settings
    (another thread may rely on them): float32 while matmuls are "highest" precision (torch's default), else
    float64, which TF32 and bf16 matmuls leave alone."""
    return torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64


def resample(images: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """uint8 or float (n, C, H, W) -> float32 (n, C, R, S): ``rows`` (n or 1, R, H) @ image @ ``columns``
    (n or 1, S, W) transposed, in one pair of batched matrix products.

    Separable weight matrices rather than ``torchvision.ops.roi_align`` or an affine grid: ``roi_align``
    averages a fixed grid of bilinear samples (a box filter convolved with a triangle), ``grid_sample`` does not
    antialias at all; neither is the filter torchvision uses, whereas these matrices hold exactly the weights
    of torch's antialiased bilinear resize (``_axis_weights``), so the crop-and-resize is
    ``v2.functional.resized_crop(..., antialias=True)`` up to float32 rounding, for shrinking and enlarging
    alike, for every example's own box, and a horizontal flip is only the columns' matrix reversed. A crop is
    all-zero columns of its matrix; the cost is that of resizing the whole source image, which is small."""
    dtype = _exact_dtype()
    x, rows, columns = images.to(dtype), rows[:, None].to(dtype), columns[:, None].to(dtype)  # broadcast over channels
    with torch.autocast(images.device.type, enabled=False):  # a local setting: no bf16 products
        if x.shape[-2] <= x.shape[-1]:  # the cheaper order: shrink the longer axis first
            out = torch.matmul(rows, torch.matmul(x, columns.transpose(-1, -2)))
        else:
            out = torch.matmul(torch.matmul(rows, x), columns.transpose(-1, -2))
    return out.to(torch.float32).clamp_(0.0, 255.0)


def _rgb(images: Tensor) -> Tensor:
    if images.shape[1] == 3:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"images must have 1 or 3 channels, not {images.shape[1]}")


def _check(images: Tensor) -> None:
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (n, C, H, W), got {images.dtype} {tuple(images.shape)}")


# --- colour jitter: torchvision's formulas with one factor per example ----------------------------------


def _grayscale(x: Tensor) -> Tensor:
    """(n, 3, H, W) -> (n, 1, H, W): torchvision's ``_rgb_to_grayscale_image`` weights (ITU-R 601-2 luma)."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's ``_blend``: ``x * f + other * (1 - f)``, clamped to the value range."""
    f = factor.to(x.dtype)[:, None, None, None]
    return (x * f + other * (1.0 - f)).clamp_(0.0, 255.0)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``F.adjust_brightness`` per example: blend with black, i.e. scale, then clamp."""
    return (x * factor.to(x.dtype)[:, None, None, None]).clamp_(0.0, 255.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``F.adjust_contrast`` per example: blend with the mean of the image's grayscale."""
    return _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """``F.adjust_saturation`` per example: blend with the image's grayscale."""
    return _blend(x, _grayscale(x), factor)


def _rgb_to_hsv(image: Tensor) -> Tensor:
    """torchvision's ``_rgb_to_hsv`` (Pillow's algorithm), on (n, 3, H, W) in [0, 1]."""
    r, g, _ = image.unbind(dim=-3)
    minc, maxc = torch.aminmax(image, dim=-3)
    eqc = maxc == minc
    channels_range = maxc - minc
    ones = torch.ones_like(maxc)
    s = channels_range / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, channels_range).unsqueeze(-3)
    rc, gc, bc = ((maxc.unsqueeze(-3) - image) / divisor).unbind(dim=-3)
    not_r = maxc != r
    is_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(is_g & not_r)
    hr = bc.sub(gc).mul_(~not_r)
    hb = gc.add(4.0).sub_(rc).mul_(not_r & ~is_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))  # (v, p, q, t) -> r, g, b by sector
_HSV_SELECT_ON: dict[torch.device, Tensor] = {}


def _hsv_select(device: torch.device) -> Tensor:
    """``_HSV_SELECT`` on ``device``, made once: a new small tensor per call would be a blocking copy to a GPU."""
    if device not in _HSV_SELECT_ON:
        _HSV_SELECT_ON[device] = torch.tensor(_HSV_SELECT, dtype=torch.int64, device=device)
    return _HSV_SELECT_ON[device]


def _hsv_to_rgb(image: Tensor) -> Tensor:
    """torchvision's ``_hsv_to_rgb``, on (n, 3, H, W)."""
    h, s, v = image.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.int64).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = _hsv_select(image.device)[:, i].moveaxis(0, -3)
    return vpqt.gather(-3, select)


def adjust_hue(x: Tensor, factor: Tensor) -> Tensor:
    """``F.adjust_hue`` per example: RGB -> HSV, hue shifted by the factor (mod 1), HSV -> RGB."""
    hsv = _rgb_to_hsv(x / 255.0)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + factor.to(x.dtype)[:, None, None]).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3)).mul_(255.0)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's fn_idx 0..3


# --- training augmentation -------------------------------------------------------------------------------

_AREA, _RATIO, _TOP, _LEFT, _FLIP, _FACTORS, _ORDER = 0, 10, 20, 21, 22, 23, 27  # slots in an example's draws
DRAWS = 31


class TrainingAugment:
    """``images.training_transform(resolution, min_area, aspect, flip, photometric)`` for a whole batch.

    ``augment(images, seeds)``: random-size crop resized to ``resolution`` (exact antialiased bilinear), flip,
    colour jitter, each example from its own seed (``example_uniforms``), all examples at once on the images'
    device; nothing loops over examples."""

    def __init__(self, resolution: int, min_area: float, aspect: tuple[float, float], flip: bool,
                 brightness: float, contrast: float, saturation: float, hue: float):
        if not 0 < min_area <= 1:
            raise ValueError(f"min_area must be in (0, 1], not {min_area}")
        if not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be (low, high) with 0 < low <= high, not {aspect}")
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError("jitter strengths must be non-negative, and hue at most 0.5")
        self.resolution, self.min_area, self.aspect, self.flip = resolution, float(min_area), tuple(aspect), flip
        # ColorJitter's ranges; an op whose range is its identity (strength 0) is skipped, as ColorJitter does
        self.ranges = ((max(0.0, 1.0 - brightness), 1.0 + brightness), (max(0.0, 1.0 - contrast), 1.0 + contrast),
                       (max(0.0, 1.0 - saturation), 1.0 + saturation), (-hue, hue))
        self.active = tuple(strength > 0 for strength in (brightness, contrast, saturation, hue))

    def parameters(self, seeds: Tensor, size: tuple[int | Tensor, int | Tensor]) -> dict[str, Tensor]:
        """Each example's draws for a source of ``size`` = (H, W): two numbers, or two (n,) int64 tensors (each
        example its own size, as decoded JPEGs are), on the seeds' device:

        - ``box`` (n, 4) int64: x0, y0, x1, y1 of the crop in source pixels (x1, y1 exclusive), as
          ``RandomResizedCrop.make_params``: 10 attempts at once, each area = H*W * U(min_area, 1) and
          log-aspect U(log a0, log a1), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first
          attempt with 0 < w <= W and 0 < h <= H wins, top ~ randint(0, H - h), left ~ randint(0, W - w);
          if none fits, torchvision's central crop with the aspect clamped (``fallback`` (n,) bool marks those);
        - ``flip`` (n,) bool: horizontal flip, probability 0.5 when enabled;
        - ``factors`` (n, 4) float64: brightness, contrast, saturation, hue factors, uniform in ColorJitter's
          ranges (1, 1, 1, 0 for an op of strength 0, which ``apply`` skips);
        - ``order`` (n, 4) int64: the ops (0 brightness .. 3 hue) in the order applied, a uniform permutation
          (the argsort of four uniforms), as ColorJitter's ``randperm(4)``."""
        u = example_uniforms(seeds, DRAWS)
        height, width = (side if isinstance(side, Tensor) else torch.full((len(u),), side, device=u.device)
                          for side in size)  # a fill, not a copy of a number to the device
        area = (height * width).to(torch.float64)[:, None]
        target = area * (self.min_area + (1.0 - self.min_area) * u[:, _AREA:_AREA + 10])
        low, high = math.log(self.aspect[0]), math.log(self.aspect[1])
        ratio = torch.exp(low + (high - low) * u[:, _RATIO:_RATIO + 10])
        w = torch.round(torch.sqrt(target * ratio)).to(torch.int64)  # round half to even, as Python's round
        h = torch.round(torch.sqrt(target / ratio)).to(torch.int64)
        fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
        fallback = ~fits.any(dim=1)
        first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)  # first attempt that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        top = torch.minimum(torch.floor(u[:, _TOP] * (height - h + 1)).to(torch.int64), height - h)
        left = torch.minimum(torch.floor(u[:, _LEFT] * (width - w + 1)).to(torch.int64), width - w)
        w0, h0 = self._fallback(height, width)
        w, h = torch.where(fallback, w0, w), torch.where(fallback, h0, h)
        top = torch.where(fallback, (height - h0) // 2, top)
        left = torch.where(fallback, (width - w0) // 2, left)
        flip = (u[:, _FLIP] < 0.5) & self.flip
        factors = torch.stack([lo + (hi - lo) * u[:, _FACTORS + k] if on else torch.full_like(u[:, 0], lo)
                               for k, ((lo, hi), on) in enumerate(zip(self.ranges, self.active))], dim=1)
        order = torch.argsort(u[:, _ORDER:_ORDER + 4], dim=1)
        return {"box": torch.stack([left, top, left + w, top + h], dim=1), "flip": flip, "factors": factors,
                "order": order, "fallback": fallback}

    def _fallback(self, height: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
        """torchvision's fallback crop size (w, h) per example: the whole image, or its centre with the aspect
        clamped (``round`` half to even, as Python's)."""
        in_ratio = width.to(torch.float64) / height.to(torch.float64)
        low, high = min(self.aspect), max(self.aspect)
        narrow, wide = in_ratio < low, in_ratio > high
        w = torch.where(wide, torch.round(height.to(torch.float64) * high).to(torch.int64), width)
        h = torch.where(narrow, torch.round(width.to(torch.float64) / low).to(torch.int64), height)
        return w, h

    def __call__(self, images: Tensor, seeds: Tensor) -> Tensor:
        """uint8 (n, C, H, W), C = 1 or 3 (1 is replicated to RGB), all the same size, on any device, + (n,) int64
        seeds -> float32 (n, 3, resolution, resolution) in [0, 255] (not re-quantized)."""
        _check(images)
        return self.apply(images, self.parameters(seeds.to(images.device), tuple(images.shape[-2:])))

    def of_images(self, images: list[Tensor], seeds: Tensor) -> Tensor:
        """The same augmentation for images of different sizes (decoded JPEGs, uint8 (C, H, W) each, on one
        device): zero-padded to the largest into one batch, each example's crop drawn for its own size (the
        padding is never inside a crop, so it gets no weight), then one batched resample and jitter."""
        sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)  # the host knows them
        height, width = (int(side) for side in sizes.max(0).values)
        padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for i, image in enumerate(images):  # one copy each, queued on the device: nothing waits
            padded[i, :, :image.shape[-2], :image.shape[-1]] = image
        sizes = to_device(sizes, padded.device)
        return self.apply(padded, self.parameters(seeds.to(padded.device), (sizes[:, 0], sizes[:, 1])))

    def apply(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The augmentation with given ``parameters`` (the same keys; ``fallback`` is not needed): crop and
        resize (with the flip folded into the resample), then the jitter ops position by position."""
        _check(images)
        n, _, height, width = images.shape
        box = params["box"].to(images.device)
        rows = _axis_weights(box[:, 1], box[:, 3] - box[:, 1], height, self.resolution)
        columns = _axis_weights(box[:, 0], box[:, 2] - box[:, 0], width, self.resolution)
        columns = torch.where(params["flip"].to(images.device)[:, None, None], columns.flip(1), columns)
        x = _rgb(resample(images, rows, columns))
        factors, order = params["factors"].to(images.device), params["order"].to(images.device)
        return jitter(x, factors, order, self.active, masked=images.device.type == "cuda")


def jitter(x: Tensor, factors: Tensor, order: Tensor, active: tuple[bool, ...], masked: bool) -> Tensor:
    """ColorJitter per example: at each of the four positions, each example applies its own op (``order``) with its
    own factor. ``masked``: every active op is computed for the whole batch and each example keeps its own op's
    result (``torch.where``), so the host never waits for the GPU (selecting the examples would need their count
    first: ``nonzero``, a synchronisation), at ~4x the jitter's arithmetic; else each op runs on its examples alone
    (cheaper on a CPU, where asking costs nothing). Both give the same numbers, element for element."""
    for position in range(4):
        for op, (adjust, on) in enumerate(zip(JITTER_OPS, active)):
            if not on:
                continue
            mine = order[:, position] == op
            if masked:
                x = torch.where(mine[:, None, None, None], adjust(x, factors[:, op]), x)
                continue
            chosen = torch.nonzero(mine).squeeze(1)
            if len(chosen):
                x[chosen] = adjust(x[chosen], factors[chosen, op])
    return x


# --- evaluation ------------------------------------------------------------------------------------------


def evaluation_view(images: Tensor, resolution: int, resize: float) -> Tensor:
    """The single centre crop of evaluation_transform for a batch: shorter side to round(resolution * resize)
    (bilinear, antialiased, as v2.Resize), then the central resolution x resolution square; float32
    (n, 3, res, res) in [0, 255].

    Sizes and offsets are torchvision's (long side ``int(short * long / short_before)``, crop offset
    ``round((size - crop) / 2)``, zero padding where the crop is larger); only the kept rows and columns of the
    resize are computed, with the exact resize weights of ``resample``."""
    _check(images)
    height, width = images.shape[-2:]
    short = round(resolution * resize)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_h, new_w = short, int(short * width / height)

    def axis(source: int, resized: int) -> Tensor:
        offset = -((resolution - resized) // 2) if resolution > resized else int(round((resized - resolution) / 2.0))
        zero = torch.zeros(1, dtype=torch.int64, device=images.device)
        return _axis_weights(zero, zero + source, source, resolution, total=resized, offset=offset)

    return _rgb(resample(images, axis(height, new_h), axis(width, new_w)))
