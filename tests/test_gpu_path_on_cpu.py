"""What a CPU can check of the GPU path (issue 20): the resident input pipeline and the network's forward pass on a
fake CUDA device (``FakeTensorMode``: tensors with devices and shapes, no data, no GPU needed). There, a CPU tensor
mixed into CUDA work raises (as it would on a GPU), and so does any operation whose result the host would have to
wait for (``nonzero``, ``.item()``, ``bool(tensor)``...: a host synchronisation inside the step); a copy to the
device must not wait either (pinned memory, ``non_blocking``). The backward pass and the optimizer are torch's own
kernels: the autograd engine needs a real GPU, so they are measured by ``benchmarks/gpu_check.sh``."""

from __future__ import annotations

import contextlib
import itertools
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
