"""What a CPU can check of the GPU path (issue 20), and what only a GPU can (marked gpu). On the CPU: the resident
input pipeline and the network's forward pass on a fake CUDA device (``FakeTensorMode``: tensors with devices and
shapes, no data, no GPU needed). There, a CPU tensor mixed into CUDA work raises (as it would on a GPU), and so does
any operation whose result the host would have to wait for (``nonzero``, ``.item()``, ``bool(tensor)``...: a host
synchronisation inside the step); a copy to the device must not wait either (pinned memory, ``non_blocking``). The
backward pass and the optimizer are torch's own kernels: the autograd engine needs a real GPU, so they are measured
by ``benchmarks/gpu_check.sh``."""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from bnrepro import recipes
from bnrepro.data.augment import jitter
from bnrepro.data.order import EvaluationBatches, TrainingStream
from bnrepro.data.pipeline import Pipeline
from bnrepro.data.resident import synthetic
from bnrepro.data.transforms import transforms_for
from bnrepro.engine.precision import autocast
from bnrepro.models.inception import Inception, InceptionConfig, count_flops

CUDA = torch.device("cuda")


class Copies(TorchDispatchMode):
    """Every copy from the host to the device, with whether it was asked not to block."""

    def __init__(self):
        super().__init__()
        self.to_device: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" \
                and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            self.to_device.append(bool(kwargs.get("non_blocking")))
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_gpu():
    """Tensors made inside live on a fake CUDA device (torch warns that CUDA is unavailable: autocast is a no-op)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield


@pytest.mark.parametrize("recipe", ["inception", "bn-x5"])  # full distortions (hue too), reduced ones
def test_a_resident_step_on_a_gpu_mixes_no_devices_and_never_makes_the_host_wait(recipe, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)  # not implemented for fake tensors
    r = recipes.load(recipe)
    profile = r.profiles["smoke"]
    train, val = synthetic(profile.resolution, classes=10, train=64, val=16)
    training = list(itertools.islice(TrainingStream(train, r.train.shuffle, 0, 8, 0, 1, 0, 8), 2))  # host work
    evaluation = list(EvaluationBatches(len(val), 8, 0, 1))
    with fake_gpu():
        transforms = transforms_for(r, profile)
        pipelines = [Pipeline(split, transforms, CUDA, seed=0, workers=0) for split in (train, val)]
        next(pipelines[0].batches(training[:1], train=True))  # the pixels go to the device once, first
        next(pipelines[1].batches(evaluation[:1], train=False))
        with torch.device(CUDA):
            model = Inception(InceptionConfig(r.model, profile.width, 10))
        with Copies() as copies:
            x, y = next(pipelines[0].batches(training[1:], train=True))
            with autocast(CUDA):
                loss = F.cross_entropy(model(x).float(), y)
            x_val, _ = next(pipelines[1].batches(evaluation[1:], train=False))
    assert x.device.type == y.device.type == loss.device.type == x_val.device.type == "cuda"
    assert x.shape == (8, 3, profile.resolution, profile.resolution)
    assert copies.to_device == [True] * 4  # positions and indices of a training and an evaluation batch: no wait


def test_the_dry_run_estimate_counts_flops_of_a_model_on_the_gpu():
    r = recipes.load("bn-x30")
    with fake_gpu(), torch.device(CUDA):
        model = Inception(InceptionConfig(r.model, 0.25, 10))
        assert count_flops(model, 32) > 0


def test_the_gpu_jitter_selects_by_mask_and_gives_the_cpus_numbers():
    """The GPU's jitter (every op on every example, each keeping its own op's result) equals the CPU's (each op on
    its own examples) element for element."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 12, generator=generator) * 255
    factors = torch.stack([0.6 + 0.8 * torch.rand(16, generator=generator) for _ in range(3)]
                          + [0.2 * torch.rand(16, generator=generator) - 0.1], dim=1).double()
    order = torch.argsort(torch.rand(16, 4, generator=generator), dim=1)
    for active in ((True, True, True, True), (True, False, True, False)):
        masked = jitter(x.clone(), factors, order, active, masked=True)
        indexed = jitter(x.clone(), factors, order, active, masked=False)
        assert torch.equal(masked, indexed)


@pytest.mark.gpu
def test_jpegs_decoded_on_the_gpu_never_overwrite_memory_that_queued_kernels_still_read():
    """pytorch/vision#9606's reproduction: tensors freed while ~40 ms of queued work still reads them; nvJPEG must
    not write its outputs into their memory before that work ran (decode_jpegs_on synchronises first)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    from torchvision.io import encode_jpeg

    from bnrepro.data.pipeline import decode_jpegs_on

    gpu = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    data = [encode_jpeg((torch.rand(3, 240, 320, generator=generator) * 255).to(torch.uint8)) for _ in range(32)]
    sizes = [image.numel() for image in decode_jpegs_on(gpu, data)]
    a = torch.randn(8192, 8192, device=gpu, dtype=torch.bfloat16)
    product = torch.empty_like(a)
    corrupted = 0
    for _ in range(20):
        victims = [torch.ones(size, dtype=torch.uint8, device=gpu) for size in sizes]
        torch.cuda.synchronize()
        for _ in range(30):
            torch.mm(a, a, out=product)  # queued ahead of the reads below
        sums = [victim.sum(dtype=torch.int64) for victim in victims]
        del victims  # freed while their reads still wait in the queue
        decode_jpegs_on(gpu, data)
        torch.cuda.synchronize()
        corrupted += any(int(total) != size for total, size in zip(sums, sizes))
    assert corrupted == 0


def test_deterministic_kernels_are_recorded_and_kept_by_a_resume(tmp_path, monkeypatch):
    """--deterministic is a run's setting: recorded in its manifest and taken from there by a resume (a CPU's kernels
    are deterministic already, so nothing global changes here)."""
    from test_imagenet import write_images

    from bnrepro.engine.distributed import SINGLE_PROCESS
    from bnrepro.experiments import imagenet

    data = write_images(tmp_path / "data", ["cat", "dog"], {"train": 4, "val": 2})
    options = imagenet.Options(data, device="cpu", workers=0, show_progress=False, deterministic=True)
    # the run is made "interrupted" below: keep its whole checkpoint, as an interrupted run has (a finished one keeps
    # only what evaluation reads)
    monkeypatch.setattr(imagenet.checkpoint, "keep_for_evaluation", lambda path: None)
    run = imagenet.run("bn-x5", "smoke", ["profiles.smoke.steps=2"], options, tmp_path / "out", SINGLE_PROCESS)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["deterministic"] is True and not torch.are_deterministic_algorithms_enabled()
    built = []

    class Built(Exception):
        pass

    def record(recipe, profile, options, replicas, synthetic=False):
        built.append(options)
        raise Built

    monkeypatch.setattr(imagenet, "build", record)
    manifest["status"] = "interrupted"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Built):
        imagenet.resume(run, SINGLE_PROCESS, device="cpu", workers=0, show_progress=False)
    assert built[0].deterministic is True


def _jpeg_folders(root, sizes: list[tuple[int, int]]):
    """train/ and val/ class folders of colour JPEGs of the given sizes (cycled), 12 training images per class."""
    from torchvision.io import encode_jpeg

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 12), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = sizes[i % len(sizes)]
                image = (torch.rand(3, h, w, generator=generator) * 200 + 40 * c).to(torch.uint8)
                (folder / f"{i}.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())
    return root


def _training_batches(split, gpu_decode: bool, steps: int = 3):
    """The first mini-batches of the training stream through a pipeline on the CPU; ``gpu_decode``: the path a GPU
    takes with --gpu-decode (JPEGs decoded by the main process in one call, augmented as one batch)."""
    r = recipes.load("inception")  # full distortions
    profile = r.profiles["smoke"]
    pipeline = Pipeline(split, transforms_for(r, profile), torch.device("cpu"), seed=4, workers=0)
    pipeline.jpegs_as_bytes = gpu_decode  # what a CUDA device sets
    stream = TrainingStream(split, "within_shard", 4, 8, 0, 1, 0, 8)
    return list(itertools.islice(pipeline.batches(stream, train=True), steps))


def test_gpu_decoded_jpegs_are_augmented_as_the_resident_images_are(tmp_path):
    """Decoded on the 'GPU' path and augmented as one batch, same-size JPEGs give exactly the resident path's batches
    (the same crops, flips and jitter from the same per-example seeds); the file path's workers (torchvision v2,
    another random stream) give other crops of the same images."""
    from bnrepro.data import sources
    from bnrepro.data.resident import make_resident

    split = sources.open_split(_jpeg_folders(tmp_path, [(40, 36)]), "train", shard_size=6)
    held = make_resident(split, cache=False)
    assert held.pixels is not None
    for (x, y), (x_held, y_held) in zip(_training_batches(split, gpu_decode=True), _training_batches(held, False)):
        assert torch.equal(x, x_held) and torch.equal(y, y_held)
    by_workers = _training_batches(split, gpu_decode=False)
    assert not torch.equal(by_workers[0][0], _training_batches(split, gpu_decode=True)[0][0])


def test_gpu_decoded_jpegs_of_many_sizes_get_each_their_own_crop(tmp_path):
    """Images of different sizes are padded into one batch; each example is what it would be alone (to the
    float32 rounding of a longer matrix product)."""
    from bnrepro.data import sources
    from bnrepro.data.order import example_seed
    from bnrepro.data.split import decode

    split = sources.open_split(_jpeg_folders(tmp_path, [(40, 30), (30, 44), (52, 52), (24, 70)]), "train",
                               shard_size=6)
    x, _ = _training_batches(split, gpu_decode=True, steps=1)[0]
    r = recipes.load("inception")
    transforms = transforms_for(r, r.profiles["smoke"])
    stream = next(iter(TrainingStream(split, "within_shard", 4, 8, 0, 1, 0, 8)))
    for row, (position, index) in enumerate(stream):
        image = decode(torch.frombuffer(bytearray(split.read(index)), dtype=torch.uint8))
        alone = transforms.train_batch(image[None], torch.tensor([example_seed(4, position)]))
        torch.testing.assert_close(x[row:row + 1], transforms.normalize(alone), rtol=0, atol=1e-5)
