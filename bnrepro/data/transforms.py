"""What a recipe does to an image before the network sees it: the one place its data settings become transforms.

``transforms_for(recipe, profile)`` reads the recipe's crop, flip, distortion, resize and normalization settings
once and gives both forms of each transform: per example with torchvision v2 (images decoded from files, one at a
time, each with its own seed: ``augment``) and per mini-batch on the device (resident images:
``bnrepro.data.augment``), drawn from the same distributions; and the normalization both end with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.transforms import v2

from bnrepro.data import augment as batched
from bnrepro.data.split import decode
from bnrepro.recipes import ImagenetRecipe, Profile


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
        torch.default_generator.manual_seed(seed)  # that one alone: torch.manual_seed would reseed the GPU's too
        return transform(image)


def prepare(data: Tensor, transform: Callable[[Tensor], Tensor], seed: int) -> Tensor | None:
    """Decode (CPU) and transform one example; ``None`` if it is unreadable."""
    image = decode(data)
    return None if image is None else augment(image, transform, seed)



class Normalize:
    """Pixels in [0, 255] (uint8 or float) -> float ``(x - 255 mean) / (255 std)``, channels_last (faster on CPUs
    and GPUs alike). The constants are made once per device: a new small tensor per batch would be a blocking
    copy to the GPU."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def __call__(self, pictures: Tensor) -> Tensor:
        if pictures.device not in self._on:
            self._on[pictures.device] = tuple(torch.tensor([255 * v for v in values], device=pictures.device)
                                              .view(1, 3, 1, 1) for values in (self.mean, self.std))
        mean, scale = self._on[pictures.device]
        return pictures.float().sub_(mean).div_(scale).contiguous(memory_format=torch.channels_last)


@dataclass(frozen=True)
class Transforms:
    """A recipe's transforms at one profile: for training and evaluation, per example and per mini-batch."""

    train: v2.Compose  # per example: random-size crop, flip, the recipe's distortions
    eval: v2.Compose  # per example: the single centre crop
    train_batch: batched.TrainingAugment  # per mini-batch, the same distributions as ``train``
    resolution: int
    eval_resize: float
    normalize: Normalize = field(compare=False)

    def eval_view(self, images: Tensor) -> Tensor:
        """The single centre crop of a mini-batch of same-size images, in float (never re-quantized)."""
        return batched.evaluation_view(images, self.resolution, self.eval_resize)


def crop_min_area(recipe: ImagenetRecipe, profile: Profile) -> float:
    """The random-size crop's smallest area at ``profile``: its own where it sets one (small images), else the
    recipe's."""
    return recipe.data.crop_min_area if profile.crop_min_area is None else profile.crop_min_area


def transforms_for(recipe: ImagenetRecipe, profile: Profile) -> Transforms:
    """The recipe's data settings (crop, flip, distortions, resize, mean and std) at the profile's resolution."""
    data, resolution = recipe.data, profile.resolution
    area = crop_min_area(recipe, profile)
    photometric = data.photometric[recipe.train.distortions].model_dump()
    return Transforms(
        train=training_transform(resolution, area, data.crop_aspect, data.flip, photometric),
        eval=evaluation_transform(resolution, data.eval_resize),
        train_batch=batched.TrainingAugment(resolution, area, data.crop_aspect, data.flip, **photometric),
        resolution=resolution, eval_resize=data.eval_resize, normalize=Normalize(data.mean, data.std))
