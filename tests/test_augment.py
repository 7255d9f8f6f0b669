"""Batched augmentation (bnrepro.data.augment) against torchvision's per-example pipeline: the same
distributions for the crop, flip and jitter parameters, and the same formulas for the ops."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bnrepro.data.augment import (
    JITTER_OPS,
    TrainingAugment,
    evaluation_view,
    example_uniforms,
)
from bnrepro.data.transforms import evaluation_transform, training_transform

FULL = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}  # recipes/imagenet/inception.yaml
TV_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


def ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (ties handled: the CDFs are compared after each distinct value)."""
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    points = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a, points, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def ks_uniform(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> float:
    """One-sample KS statistic of ``x`` against U(low, high)."""
    x = ((x.double().flatten() - low) / (high - low)).sort().values
    n = len(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - x
    below = x - torch.arange(n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def splitmix_reference(seed: int, count: int) -> list[float]:
    """The draws of ``example_uniforms`` in plain Python integers (uint64 arithmetic by masking)."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    key = mix((seed + 0x9E3779B97F4A7C15) & mask)
    return [(mix((key + k * 0x9E3779B97F4A7C15) & mask) >> 11) * 2.0 ** -53 for k in range(1, count + 1)]


def torchvision_crops(size: tuple[int, int], n: int, min_area: float, aspect: tuple[float, float]) -> torch.Tensor:
    """(n, 4) top, left, height, width from torchvision's own RandomResizedCrop, one manual seed per example."""
    transform = v2.RandomResizedCrop(32, scale=(min_area, 1.0), ratio=aspect)
    image = torch.empty(3, *size)
    found = []
    with torch.random.fork_rng(devices=[]):
        for seed in range(n):
            torch.manual_seed(seed)
            p = transform.make_params([image])
            found.append((p["top"], p["left"], p["height"], p["width"]))
    return torch.tensor(found)


def our_crops(size: tuple[int, int], n: int, min_area: float, aspect: tuple[float, float]) -> tuple[torch.Tensor, ...]:
    augment = TrainingAugment(32, min_area, aspect, True, **FULL)
    p = augment.parameters(torch.arange(n) + (3 << 40), size)
    x0, y0, x1, y1 = p["box"].unbind(1)
    return torch.stack([y0, x0, y1 - y0, x1 - x0], dim=1), p["fallback"]


def images_of(n: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random uint8 images with saturated patches, so resampling and clamping both matter."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, channels, height // 4 + 1, width // 4 + 1, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)
    noisy = smooth * 1.3 - 0.15 + 0.1 * torch.rand(n, channels, height, width, generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


# --- uniforms --------------------------------------------------------------------------------------------


def test_example_uniforms_are_a_per_seed_hash():
    seeds = torch.tensor([0, 1, 2, -1, (5 << 40) + 123, (1 << 62) + 7, -(1 << 63)])
    u = example_uniforms(seeds, 8)
    assert u.dtype == torch.float64 and u.shape == (7, 8)
    for seed, row in zip(seeds.tolist(), u.tolist()):
        assert row == splitmix_reference(seed % (1 << 64), 8)  # exactly, bit for bit
    assert torch.equal(u, example_uniforms(seeds, 8))  # deterministic
    assert torch.equal(example_uniforms(seeds, 3), u[:, :3])  # a shorter count is a prefix
    batch = torch.arange(1000) + (9 << 40)
    many = example_uniforms(batch, 4)
    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(example_uniforms(batch[shuffled], 4), many[shuffled])  # whatever batch it is in
    assert torch.equal(example_uniforms(batch[17:18], 4), many[17:18])
    assert len(many[:, 0].unique()) == 1000  # different seeds differ


def test_example_uniforms_are_uniform():
    u = example_uniforms(torch.arange(10_000) + (2 << 40), 2).flatten()  # 20,000 draws
    assert u.min().item() >= 0 and u.max().item() < 1
    assert ks_uniform(u) < 0.015  # 1% critical value 1.63 / sqrt(20000) = 0.0115
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (counts - 1000).abs().max().item() < 140  # binomial sd ~31
    a, b = example_uniforms(torch.arange(10_000), 2).unbind(1)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.04  # draws of one seed look independent


# --- parameter distributions against torchvision ---------------------------------------------------------


@pytest.mark.parametrize("size", [(28, 28), (100, 60)])
def test_crop_distribution_matches_random_resized_crop(size):
    n, height, width = 5000, *size
    theirs = torchvision_crops(size, n, 0.08, (0.75, 1.3333333)).double()
    ours, _ = our_crops(size, n, 0.08, (0.75, 1.3333333))
    ours = ours.double()
    top, left, h, w = ours.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = lambda c: c[:, 2] * c[:, 3] / (height * width)  # noqa: E731
    log_aspect = lambda c: torch.log(c[:, 3] / c[:, 2])  # noqa: E731
    assert ks(area(ours), area(theirs)) < 0.05  # 1% critical value 1.63 * sqrt(2 / 5000) = 0.033
    assert ks(log_aspect(ours), log_aspect(theirs)) < 0.05
    assert ks(ours[:, 0], theirs[:, 0]) < 0.05  # top and left, uniform over the room left by the crop
    assert ks(ours[:, 1], theirs[:, 1]) < 0.05
    relative = lambda c: (c[:, 0] + 0.5) / (height - c[:, 2] + 1)  # noqa: E731
    assert ks(relative(ours), relative(theirs)) < 0.05


def test_fallback_rate_and_box_match_random_resized_crop():
    # wide aspects (3..4) on a tall 100 x 60 source: ~1 in 6 examples find no fitting crop in 10 attempts
    size, n, aspect = (100, 60), 5000, (3.0, 4.0)
    theirs = torchvision_crops(size, n, 0.01, aspect)
    ours, fallback = our_crops(size, n, 0.01, aspect)
    central = torch.tensor([40, 0, 20, 60])  # width 60, height round(60 / 3), centred: torchvision's fallback
    rate_theirs = (theirs == central).all(1).double().mean().item()
    rate_ours = fallback.double().mean().item()
    assert 0.1 < rate_theirs < 0.3
    assert abs(rate_ours - rate_theirs) < 0.03  # sd of the difference ~0.0075
    assert (ours[fallback] == central).all()
    assert ks(ours[~fallback, 2].double() * ours[~fallback, 3], theirs[~(theirs == central).all(1), 2].double()
              * theirs[~(theirs == central).all(1), 3]) < 0.06
    # no attempt can fit (aspect 2 on a square, whole area): always the fallback, exactly torchvision's box
    always = torchvision_crops((30, 30), 20, 1.0, (2.0, 2.5))
    ours, fallback = our_crops((30, 30), 20, 1.0, (2.0, 2.5))
    assert fallback.all() and torch.equal(ours, always)


def test_flip_factors_and_order_distributions():
    n = 20_000
    augment = TrainingAugment(32, 0.08, (0.75, 4 / 3), True, brightness=0.4, contrast=0.2, saturation=1.5, hue=0.1)
    p = augment.parameters(torch.arange(n) + (4 << 40), (28, 28))
    assert abs(p["flip"].double().mean().item() - 0.5) < 0.015
    ranges = [(0.6, 1.4), (0.8, 1.2), (0.0, 2.5), (-0.1, 0.1)]  # max(0, 1 - s) .. 1 + s; hue -h .. h
    for k, (low, high) in enumerate(ranges):
        f = p["factors"][:, k]
        assert low <= f.min().item() and f.max().item() <= high
        assert ks_uniform(f, low, high) < 0.015
    order = p["order"]
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(n, 4))  # permutations
    for op in range(4):
        for position in range(4):
            assert abs((order[:, position] == op).double().mean().item() - 0.25) < 0.015
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0]
    assert len(counts) == 24 and (counts - n / 24).abs().max().item() < 150  # sd ~28
    still = TrainingAugment(32, 0.08, (0.75, 4 / 3), False, brightness=0.1, contrast=0.0, saturation=0.1, hue=0.0)
    q = still.parameters(torch.arange(1000), (28, 28))
    assert not q["flip"].any()
    assert still.active == (True, False, True, False)
    assert (q["factors"][:, 1] == 1).all() and (q["factors"][:, 3] == 0).all()  # skipped ops: identity factors


# --- ops against torchvision's functional ops ------------------------------------------------------------


def test_jitter_ops_equal_torchvision_per_image():
    g = torch.Generator().manual_seed(5)
    images = (torch.rand(6, 3, 12, 14, generator=g) * 1.4 - 0.2).clamp(0, 1)  # [0, 1], some pixels saturated
    images[0, :, :3] = images[0, :1, :3]  # a few grey pixels (hue undefined there)
    factors = [torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4, 2.0]), torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4, 2.0]),
               torch.tensor([0.0, 0.6, 1.0, 1.3, 1.4, 2.0]), torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])]
    for ours, theirs, f in zip(JITTER_OPS, TV_OPS, factors):
        found = ours(images * 255, f) / 255
        expected = torch.stack([theirs(image, float(fi)) for image, fi in zip(images, f)])
        assert (found - expected).abs().max().item() < 2e-6, ours.__name__
        # torchvision on uint8 floors the grayscale (up to |1 - f| grey levels lower) and casts the result (truncates,
        # < 1 level): measured max 1.0 / 1.5 / 1.4 / 0.9, mean 0.13 / 0.45 / 0.31 / 0.05 (brightness .. hue)
        quantized = (images * 255).round()
        on_bytes = torch.stack([theirs(image, float(fi)) for image, fi in zip(quantized.to(torch.uint8), f)])
        difference = (ours(quantized, f) - on_bytes.float()).abs()
        assert difference.max().item() <= 2.0 and difference.mean().item() < 1.0, ours.__name__


def test_crop_and_resize_equals_resized_crop():
    augment = TrainingAugment(32, 0.08, (0.75, 4 / 3), False, 0.0, 0.0, 0.0, 0.0)
    images = images_of(4, 3, 100, 60)
    boxes = torch.tensor([[5, 3, 55, 83], [7, 10, 22, 30], [0, 0, 60, 100], [30, 40, 58, 98]])  # x0, y0, x1, y1
    params = {"box": boxes, "flip": torch.tensor([False, True, False, True]), "factors": torch.zeros(4, 4),
              "order": torch.arange(4).expand(4, 4)}
    found = augment.apply(images, params)
    for image, (x0, y0, x1, y1), flip, mine in zip(images, boxes.tolist(), params["flip"], found):
        expected = F.resized_crop(image.float(), y0, x0, y1 - y0, x1 - x0, [32, 32], antialias=True)
        on_bytes = F.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [32, 32], antialias=True).float()
        if flip:
            expected, on_bytes = expected.flip(-1), on_bytes.flip(-1)
        # the same filter as torch's antialiased bilinear resize: float32 rounding only (measured max 6e-5)
        # (roi_align, aligned=True, sampling_ratio 0/2/4, measured 0.5-8 mean, up to 30 max grey levels off here)
        assert (mine - expected).abs().max().item() < 1e-3
        # torchvision's uint8 resize rounds its output: measured mean 0.27-0.29, max 0.98 grey levels
        assert (mine - on_bytes).abs().mean().item() < 0.5 and (mine - on_bytes).abs().max().item() < 1.05


def test_upscaling_is_plain_bilinear():
    # Fashion-MNIST's 28 px to 32 and 64: every crop is enlarged
    images = images_of(3, 1, 28, 28)
    for resolution in (32, 64):
        augment = TrainingAugment(resolution, 0.08, (0.75, 4 / 3), False, 0.0, 0.0, 0.0, 0.0)
        boxes = torch.tensor([[0, 0, 28, 28], [3, 5, 20, 26], [10, 2, 27, 9]])
        params = {"box": boxes, "flip": torch.zeros(3, dtype=torch.bool), "factors": torch.zeros(3, 4),
                  "order": torch.arange(4).expand(3, 4)}
        found = augment.apply(images, params)
        for image, (x0, y0, x1, y1), mine in zip(images.float(), boxes.tolist(), found):
            crop = image[None, :, y0:y1, x0:x1]
            bilinear = torch.nn.functional.interpolate(crop, size=(resolution, resolution), mode="bilinear",
                                                       align_corners=False)[0]
            assert (mine - bilinear.expand(3, -1, -1)).abs().max().item() < 1e-3


def test_training_augment_equals_torchvision_ops_with_its_parameters():
    augment = TrainingAugment(24, 0.08, (0.75, 1.3333333), True, **FULL)
    images = images_of(16, 3, 100, 60, seed=3)
    seeds = torch.arange(16) + (11 << 40)
    found = augment(images, seeds)
    assert found.shape == (16, 3, 24, 24) and found.dtype == torch.float32
    assert found.min().item() >= 0 and found.max().item() <= 255
    p = augment.parameters(seeds, (100, 60))
    worst, bias = 0.0, []
    for k, image in enumerate(images):
        x0, y0, x1, y1 = p["box"][k].tolist()
        expected = F.resized_crop(image.float() / 255, y0, x0, y1 - y0, x1 - x0, [24, 24], antialias=True)
        on_bytes = F.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [24, 24], antialias=True)
        if p["flip"][k]:
            expected, on_bytes = F.horizontal_flip(expected), F.horizontal_flip(on_bytes)
        for op in p["order"][k].tolist():
            factor = float(p["factors"][k, op])
            expected, on_bytes = TV_OPS[op](expected, factor), TV_OPS[op](on_bytes, factor)
        worst = max(worst, (found[k] - expected * 255).abs().max().item())
        bias.append((found[k] - on_bytes.float()).mean().item())
    assert worst < 0.02  # float formulas, float32 rounding only (measured max 5e-4 grey levels)
    # torchvision's uint8 pipeline truncates after each of its ops and floors the grayscale, so it comes out darker:
    # measured ours - theirs +0.92 .. +1.82 per image, +1.37 on average (mean absolute difference 1.39)
    assert 0 < sum(bias) / len(bias) < 2.0


def test_same_seed_same_result_in_any_batch_and_one_channel_is_replicated():
    augment = TrainingAugment(20, 0.08, (0.75, 4 / 3), True, **FULL)
    grey = images_of(10, 1, 28, 28, seed=4)
    seeds = torch.arange(10) * 7919 + 13
    found = augment(grey, seeds)
    assert found.shape == (10, 3, 20, 20)
    assert torch.equal(found, augment(grey.expand(-1, 3, -1, -1).contiguous(), seeds))
    order = torch.tensor([3, 7, 1])
    assert torch.equal(augment(grey[order], seeds[order]), found[order])
    assert not torch.equal(augment(grey, seeds + 1), found)
    # no jitter, no flip, the whole square at its own size: the identity
    plain = TrainingAugment(28, 1.0, (1.0, 1.0), False, 0.0, 0.0, 0.0, 0.0)
    assert torch.equal(plain(grey, seeds), grey.expand(-1, 3, -1, -1).float())


def test_reduced_distortions_skip_hue_and_match_the_recipe_transform_in_law():
    # recipes/imagenet/inception.yaml's "reduced": hue 0 is skipped; brightness etc. stay in 0.9 .. 1.1
    reduced = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.0}
    augment = TrainingAugment(16, 0.08, (0.75, 1.3333333), True, **reduced)
    assert augment.active == (True, True, True, False)
    images = images_of(600, 3, 28, 28, seed=6)
    ours = augment(images, torch.arange(600))
    transform = training_transform(16, 0.08, (0.75, 1.3333333), True, reduced)
    with torch.random.fork_rng(devices=[]):
        theirs = []
        for k, image in enumerate(images):
            torch.manual_seed(k)
            theirs.append(transform(image).float())
        theirs = torch.stack(theirs)
    # same law, different draws: sd of the mean ~0.7; torchvision's uint8 truncation is ~1 level darker
    # (measured: mean 139.05 here, 137.62 torchvision; std 60.36 and 60.54)
    assert abs(ours.mean().item() - theirs.mean().item()) < 3.5
    assert abs(ours.std().item() - theirs.std().item()) < 2.0


# --- evaluation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "channels", "resolution", "resize"), [
    ((100, 60), 3, 32, 1.142857), ((60, 100), 3, 24, 1.142857), ((28, 28), 1, 32, 1.142857),
    ((28, 28), 3, 24, 1.142857), ((45, 70), 3, 40, 0.5),  # the last: a crop larger than the image, zero padded
])
def test_evaluation_view_equals_evaluation_transform(size, channels, resolution, resize):
    images = images_of(3, channels, *size, seed=8)
    found = evaluation_view(images, resolution, resize)
    assert found.shape == (3, 3, resolution, resolution) and found.dtype == torch.float32
    transform = evaluation_transform(resolution, resize)
    for image, mine in zip(images, found):
        expected = transform(image).float().expand(3, -1, -1)
        exact = transform(image.float()).expand(3, -1, -1)
        assert (mine - exact).abs().max().item() < 1e-3
        # vs float torchvision: measured max 3e-4; vs uint8 (its rounding only): measured mean 0.11-0.32, max 1.0
        assert (mine - expected).abs().mean().item() < 0.5 and (mine - expected).abs().max().item() < 1.05


# --- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_cpu_results():
    cuda = torch.device("cuda")
    seeds = torch.arange(64) + (12 << 40)
    assert torch.equal(example_uniforms(seeds.to(cuda), 31).cpu(), example_uniforms(seeds, 31))
    augment = TrainingAugment(32, 0.08, (0.75, 1.3333333), True, **FULL)
    for channels in (1, 3):
        images = images_of(64, channels, 100, 60, seed=9)
        for key, value in augment.parameters(seeds.to(cuda), (100, 60)).items():
            assert torch.equal(value.cpu(), augment.parameters(seeds, (100, 60))[key]), key
        on_gpu = augment(images.to(cuda), seeds)
        assert on_gpu.device.type == "cuda"
        assert (on_gpu.cpu() - augment(images, seeds)).abs().max().item() < 0.05
        assert (evaluation_view(images.to(cuda), 32, 1.142857).cpu()
                - evaluation_view(images, 32, 1.142857)).abs().max().item() < 1e-2
    assert math.isfinite(on_gpu.sum().item())
