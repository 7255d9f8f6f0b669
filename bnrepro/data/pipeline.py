"""The input pipeline: one split's examples in, the mini-batches the network takes out.

``Pipeline.batches(sampler, train)`` gives (normalized float images, labels) on the device for the examples a
sampler names (``bnrepro.data.order``), from any split:

- resident data (``Split.pixels``, held on the device): cut, augmented and resized there in one batched call per
  mini-batch, each example with its own seed;
- files: decoded and augmented example by example by a DataLoader's workers (torchvision v2), each example with
  its own seed; with ``gpu_decode`` on a GPU, the workers pass JPEGs on undecoded, the main process decodes them
  there in one call per mini-batch and, for training, augments the mini-batch there at once as resident data is
  (``TrainingAugment.of_images``: the same distributions and per-example seeds).

Unreadable images are dropped from their mini-batch and counted in ``Pipeline.skipped``. ``Pipeline.images`` gives
the decoded images alone (no transform) for callers that cut their own views (the multi-crop evaluation).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from bnrepro.data.order import example_seed
from bnrepro.data.split import Split, decode, is_jpeg
from bnrepro.data.transforms import Transforms, augment, prepare
from bnrepro.runs import to_device


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


def decode_jpegs_on(device: torch.device, encoded: list[Tensor]) -> list[Tensor | None]:
    """Many JPEGs (CPU byte tensors) in one call on the GPU (nvJPEG); if the batch fails, image by image, and
    an image the GPU decoder rejects (e.g. CMYK) is decoded on the CPU, so only unreadable files are lost."""
    # nvJPEG's hardware decoder writes its outputs without waiting for the work queued on the caller's stream, into
    # memory the caching allocator may have freed from tensors that queued work still reads (pytorch/vision#9606:
    # 199 of 200 trials corrupted on an H100); torchcodec fixed it by synchronising first (pytorch/torchcodec#1634).
    # A host wait per decoded mini-batch: the price of JPEGs decoded on the GPU (resident data never waits).
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
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


class Pipeline:
    """One split's mini-batches on ``device``, as the network takes them (see the module docstring)."""

    def __init__(self, split: Split, transforms: Transforms, device: torch.device, seed: int, workers: int,
                 gpu_decode: bool = True):
        self.split, self.transforms, self.device, self.seed, self.workers = split, transforms, device, seed, workers
        self.jpegs_as_bytes = device.type == "cuda" and gpu_decode  # workers pass JPEGs on undecoded
        self.skipped = 0  # unreadable images met so far
        self._resident: tuple[Tensor, Tensor] | None = None  # pixels and labels on the device, once used
        self._kept: DataLoader | None = None  # the persistent loader: its workers serve every evaluation

    def batches(self, sampler: Sampler, train: bool, persistent: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """(normalized channels_last images, labels) of each mini-batch ``sampler`` names, augmented for training
        or cut to the evaluation view. ``persistent``: the same sampler every call (the validation set), so its
        loader's workers start once."""
        if self.split.pixels is not None:
            yield from self._resident_batches(sampler, train)
            return
        batched = train and self.jpegs_as_bytes  # decoded on the GPU: augmented there as one batch, as resident data
        transform = v2.Identity() if batched else self.transforms.train if train else self.transforms.eval
        if not persistent:
            loader = self.loader(sampler, transform)
        else:
            self._kept = self._kept or self.loader(sampler, transform, persistent=True)
            loader = self._kept
        for batch in loader:
            batch = on_device(batch, transform, self.seed, self.device)
            yield self._augmented(batch) if batched else self._tensor(batch)

    def images(self, sampler: Sampler) -> Iterator[Batch]:
        """Each mini-batch's readable images decoded (uint8 RGB, on the device), untransformed."""
        for batch in self.loader(sampler, v2.Identity()):
            batch = on_device(batch, v2.Identity(), self.seed, self.device)
            self.skipped += len(batch.skipped)
            yield batch

    def loader(self, sampler: Sampler, transform: Callable[[Tensor], Tensor], persistent: bool = False) -> DataLoader:
        workers = self.workers
        return DataLoader(Examples(self.split, transform, self.seed, self.jpegs_as_bytes), batch_sampler=sampler,
                          num_workers=workers, collate_fn=collate, pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if workers else None, persistent_workers=persistent and workers > 0,
                          generator=torch.Generator())  # the loader must not draw from the global RNG (resume)

    def _resident_batches(self, sampler: Sampler, train: bool) -> Iterator[tuple[Tensor, Tensor]]:
        if self._resident is None:
            labels = torch.as_tensor(self.split.labels)
            self._resident = (self._place(self.split.pixels), to_device(labels, self.device))
        pixels, labels = self._resident
        for items in sampler:
            positions, indices = (torch.tensor(column) for column in zip(*items))
            seeds = example_seed(self.seed, 0) + to_device(positions, self.device)  # each example's own, as on files
            on_device = to_device(indices, self.device)
            held_there = pixels.device.type == self.device.type  # else in host memory (see _place)
            batch = pixels[on_device] if held_there else to_device(pixels[indices], self.device)
            x = self.transforms.train_batch(batch, seeds) if train else self.transforms.eval_view(batch)
            yield self.transforms.normalize(x), labels[on_device]

    def _place(self, pixels: Tensor) -> Tensor:
        """Where the resident pixels live: on the device, unless they would take more than a quarter of its free
        memory (the network needs the rest); then in pinned host memory, each mini-batch gathered there and copied."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return pixels.to(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        if pixels.nbytes <= free // 4:
            return pixels.to(self.device)
        print(f"note: {self.split.where} ({pixels.nbytes / 2**30:.1f} GiB decoded) stays in host memory: more than a "
              f"quarter of the GPU's free {free / 2**30:.1f} GiB", file=sys.stderr, flush=True)
        return pixels.pin_memory()

    def _augmented(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """A batch of decoded images of any sizes, augmented together on the device (``TrainingAugment.of_images``:
        the resident path's distributions and per-example seeds, no per-image Python but a copy into the batch)."""
        self.skipped += len(batch.skipped)
        if len(batch.labels) == 0:
            return self._empty(batch)
        seeds = example_seed(self.seed, 0) + to_device(torch.tensor(batch.positions), self.device)
        x = self.transforms.train_batch.of_images(list(batch.images), seeds)
        return self.transforms.normalize(x), batch.labels.to(self.device, non_blocking=True)

    def _tensor(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The batch's readable images as a normalized float batch, and their labels; unreadable ones counted."""
        self.skipped += len(batch.skipped)
        if len(batch.labels) == 0:
            return self._empty(batch)
        pictures = batch.images if isinstance(batch.images, Tensor) else torch.stack(batch.images)
        return self.transforms.normalize(pictures), batch.labels.to(self.device, non_blocking=True)

    def _empty(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """No readable image in the mini-batch: an empty one (the trainer skips the update on every replica)."""
        resolution = self.transforms.resolution
        return torch.empty(0, 3, resolution, resolution, device=self.device), batch.labels
