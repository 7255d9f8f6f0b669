"""Multi-crop geometry against hand-computed coordinates (GoogLeNet Sec. 7 / paper Sec. 4.2.3)."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA
from torchvision.transforms import v2

from bnrepro.evaluate.crops import (
    Box,
    boxes,
    crops_of,
    distinct_boxes,
    distinct_crops_of,
    distinct_views,
    resized_shape,
)


def test_144_crops_of_a_landscape_image_by_hand():
    found = boxes(375, 500, 144)  # a typical ImageNet photo, 500 wide
    assert len(found) == 144 and len(set(found)) == 144
    # scale 256: resized to 256 x int(256 * 500 / 375) = 256 x 341; squares at left 0, round(42.5) = 42, 85
    first = [b for b in found if b.scale == 256]
    assert resized_shape(375, 500, 256) == (256, 341)
    squares = sorted({(b.top, b.left) for b in first if b.side == 256})
    assert squares == [(0, 0), (0, 42), (0, 85)]
    centre_square = [b for b in first if 42 <= b.left < 85 and not b.mirror]
    assert {(b.top, b.left, b.side) for b in centre_square} == {
        (0, 42, 224), (0, 42 + 32, 224), (32, 42, 224), (32, 74, 224),  # 4 corners (256 - 224 = 32)
        (16, 58, 224),  # centre: 42 + 16
        (0, 42, 256),  # the square itself, resized to 224
    }
    # scale 352: 352 x int(352 * 500 / 375) = 352 x 469; right square at 469 - 352 = 117; its centre crop
    assert resized_shape(375, 500, 352) == (352, 469)
    assert Box(352, 64, 117 + 64, 224, True) in found  # mirrored centre crop of the right square
    assert sum(b.mirror for b in found) == 72


def test_144_crops_of_a_portrait_image_take_top_centre_bottom_squares():
    found = boxes(400, 300, 144)
    assert resized_shape(400, 300, 288) == (384, 288)  # int(288 * 400 / 300)
    squares = sorted({(b.top, b.left) for b in found if b.scale == 288 and b.side == 288})
    assert squares == [(0, 0), (48, 0), (96, 0)]


def test_a_square_image_gives_three_identical_squares():
    found = boxes(256, 256, 144)
    assert len(found) == 144 and len(set(found)) == 48  # left = centre = right


def test_10_and_1_crops_match_torchvision():
    image = torch.randint(0, 256, (3, 300, 410), dtype=torch.uint8)
    ten = crops_of(image, 10)
    resized = v2.functional.resize(image, 256, antialias=True)
    five = v2.functional.five_crop(resized, 224)  # tl, tr, bl, br, centre
    expected = [five[4], five[0], five[1], five[2], five[3]]
    expected += [crop.flip(-1) for crop in expected]
    assert torch.equal(ten, torch.stack(expected))
    one = crops_of(image, 1)
    assert torch.equal(one[0], v2.functional.center_crop(resized, 224))


def test_1_crop_follows_the_recipes_eval_resize_by_hand():
    # 224 px, the recipes' 1.142857: shorter side round(255.99997) = 256, 256 x int(256 * 500 / 375) = 341;
    # centre top (256 - 224) / 2 = 16, left round((341 - 224) / 2) = round(58.5) = 58 (Python's, as torchvision)
    assert boxes(375, 500, 1, 224, 1.142857) == [Box(256, 16, 58, 224, False)]
    # 64 px, resize 1.3: shorter side round(83.2) = 83, 83 x int(110.67) = 110; top round(9.5) = 10, left 23
    assert boxes(375, 500, 1, 64, 1.3) == [Box(83, 10, 23, 64, False)]
    # the smoke profile's 32 px on a 40 x 30 portrait: round(36.57) = 37, int(37 * 40 / 30) = 49 x 37;
    # top round(8.5) = 8, left round(2.5) = 2
    assert boxes(40, 30, 1, 32, 1.142857) == [Box(37, 8, 2, 32, False)]
    assert boxes(375, 500, 10, 224, 1.3) == boxes(375, 500, 10, 224)  # 10 crops keep 256 for 224


@pytest.mark.parametrize("shape,size,resize", [((3, 375, 500), 64, 1.3), ((3, 40, 30), 32, 1.142857),
                                               ((3, 30, 44), 32, 1.142857), ((3, 300, 410), 224, 1.6)])
def test_1_crop_is_the_trainers_evaluation_view(shape, size, resize):
    from bnrepro.data import transforms

    image = torch.randint(0, 256, shape, dtype=torch.uint8)
    expected = transforms.evaluation_transform(size, resize)(image)
    assert torch.equal(crops_of(image, 1, size, resize)[0], expected)
    box = boxes(*shape[1:], 1, size, resize)[0]
    resized = v2.functional.resize(image, box.scale, antialias=True)
    assert torch.equal(expected, resized[:, box.top:box.top + size, box.left:box.left + size])


def test_crops_are_cut_where_the_boxes_say():
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8)
    views = crops_of(image, 144)
    assert views.shape == (144, 3, 224, 224) and views.dtype == torch.uint8
    resized = v2.functional.resize(image, 288, antialias=True)
    for i, box in enumerate(boxes(375, 500, 144)):
        if box.scale == 288 and box.side == 224:
            cut = resized[:, box.top:box.top + 224, box.left:box.left + 224]
            assert torch.equal(views[i], cut.flip(-1) if box.mirror else cut)


@pytest.mark.parametrize("shape", [(1, 40, 30), (3, 20, 500), (3, 1000, 50)])
def test_any_size_or_aspect_works(shape):
    image = torch.randint(0, 256, shape, dtype=torch.uint8).expand(3, *shape[1:])  # grayscale as RGB
    assert crops_of(image, 144, size=32).shape == (144, 3, 32, 32)


def test_small_resolutions_scale_the_protocol():
    assert {b.scale for b in boxes(64, 64, 144, size=64)} == {73, 82, 91, 101}


@pytest.mark.skipif(not (SHARED_DATA / "imagenet-sample").is_dir(), reason="shared/data/imagenet-sample is absent")
def test_real_photos_give_144_crops():
    from bnrepro.data import sources
    from bnrepro.data.split import decode

    split = sources.open_split(SHARED_DATA / "imagenet-sample", "val")
    image = decode(torch.frombuffer(bytearray(split.read(0)), dtype=torch.uint8))
    assert crops_of(image, 144).shape == (144, 3, 224, 224)


@pytest.mark.parametrize("shape,size", [((28, 28), 32), ((28, 28), 224), ((375, 500), 224), ((30, 44), 32),
                                        ((40, 30), 32), ((64, 64), 64), ((20, 500), 32)])
def test_distinct_views_are_the_distinct_crops_of_a_random_image(shape, size):
    """The count from the geometry equals the number of different crops actually cut from a random image (which
    has no symmetry that could make two different boxes give the same pixels)."""
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for crops in (1, 10, 144):
        views = crops_of(image, crops, size)
        assert distinct_views(*shape, crops, size) == len({view.numpy().tobytes() for view in views})


def test_a_square_images_144_crops_are_48_views_three_times_each():
    assert distinct_views(28, 28, 144, 32) == 48 and distinct_views(256, 256, 144) == 48
    assert distinct_views(375, 500, 144) == 144 and distinct_views(28, 28, 10, 32) == 10
    found = boxes(28, 28, 144, 32)
    assert all(found.count(box) == 3 for box in found)


@pytest.mark.parametrize("shape,size,resize", [((1, 28, 28), 32, 256 / 224), ((3, 40, 30), 32, 1.142857),
                                               ((3, 300, 410), 64, 1.3)])
def test_the_float_single_crop_is_the_resident_trainers_view(shape, size, resize):
    """With ``float_view`` the single crop is ``augment.evaluation_view`` (what the trainer evaluates resident data
    on), within 1 grey level of torchvision's uint8 view, which rounds it."""
    from bnrepro.data import augment, transforms

    image = torch.randint(0, 256, shape, dtype=torch.uint8).expand(3, *shape[1:])
    view = crops_of(image, 1, size, resize, float_view=True)
    assert view.dtype == torch.float32 and view.shape == (1, 3, size, size)
    assert torch.equal(view, augment.evaluation_view(image[None], size, resize))
    rounded = crops_of(image, 1, size, resize)
    assert torch.equal(rounded[0], transforms.evaluation_transform(size, resize)(image))
    assert (view - rounded.float()).abs().max() <= 1.0 + 1e-3
    assert torch.equal(crops_of(image, 144, size, float_view=True), crops_of(image, 144, size))  # others: uint8


@pytest.mark.parametrize("shape,size", [((28, 28), 32), ((32, 32), 32), ((30, 44), 32), ((40, 30), 32),
                                        ((375, 500), 64), ((20, 500), 32)])
def test_the_distinct_views_gathered_by_their_index_are_all_views(shape, size):
    """``distinct_crops_of`` cuts each view once; its index puts every one of the scheme's views back where
    ``crops_of`` has it (1 and 10 crops: every view distinct, the index 0, 1, 2, ...)."""
    image = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for crops in (1, 10, 144):
        views, index = distinct_crops_of(image, crops, size)
        assert len(views) == distinct_views(*shape, crops, size) and index.shape == (crops,)
        assert torch.equal(views[index], crops_of(image, crops, size))
        assert len({view.numpy().tobytes() for view in views}) == len(views)  # no view cut twice
        found, where = distinct_boxes(*shape, crops, size)
        assert [found[i] for i in where] == boxes(*shape, crops, size) and where == index.tolist()
        if crops < 144:
            assert index.tolist() == list(range(crops))
