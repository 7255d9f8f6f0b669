"""Alg. 2's population pass on the native engine (``NativeStack.estimate_population``) against the torch engine's
(``MLPStack.estimate_population``), which tests/test_mlp_stack.py checks against Alg. 2 computed by hand.

How close "to float32 rounding" is: both engines compute each batch's statistics in float32, in different orders
(torch's reductions and bmm against the kernel's sums and FMA tiles), then sum them in float64. So a variance, a
sum of squares, agrees to about 1 ulp of itself (measured: under 1 ulp); a mean, which may cancel to near 0,
agrees to about 1 ulp of the layer's inputs, not of itself (measured: under 0.8 ulp of the largest value in its
layer, while up to 130 ulp of a mean near 0). Hence ``rtol`` of 4 ulp and ``atol`` of 4 ulp of the layer's largest
value: a margin of 4x over what was measured, and tens of thousands of times tighter than any error of form (the
biased variance, m/(m-1) = 60/59, is off by 1.7%; one batch too few or too many by ~1/71).
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from bnrepro.experiments import mnist as experiment
from bnrepro.models.binary import BinaryBatch
from bnrepro.models.mlp import MLPStack
from bnrepro.models.mlp_native import BinaryRows, NativeStack

pytestmark = pytest.mark.usefixtures("native_engine")

ULP = torch.finfo(torch.float32).eps  # 2^-23: one unit in the last place at 1.0
BATCHES = 71  # prime: a multiple neither of the kernel's runs of 32 batches, nor of the thread counts


def _trained(widths, batch_norm, nonlinearity: str, batch: int, seed: int = 0):
    """A stack trained a few native steps (so gamma, beta and the weights are no longer their initial values), its
    data as ``BinaryRows`` and as bits, and ``BATCHES`` mini-batches of ``batch`` examples for Alg. 2."""
    generator = torch.Generator().manual_seed(seed)
    bits = torch.rand(300, widths[0], generator=generator) < 0.15
    labels = torch.randint(0, widths[-1], (300,), generator=generator)
    stack = MLPStack(list(range(len(batch_norm))), list(widths), batch_norm=list(batch_norm),
                     nonlinearity=nonlinearity, init="truncated_normal", init_std=0.1, bn_eps=1e-5, bn_momentum=0.1)
    rows = BinaryRows.of(bits)
    NativeStack(stack).train_steps(torch.randint(0, len(bits), (30, batch), generator=generator), rows, labels,
                                   [0.5] * 30)
    return stack, rows, bits, torch.randint(0, len(bits), (BATCHES, batch), generator=generator)


def _population(stack: MLPStack) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in stack.named_buffers() if name.startswith("pop_")}


@pytest.mark.parametrize("widths, batch", [
    ((784, 100, 100, 100, 10), 60),  # the paper's network and mini-batch
    ((50, 37, 19, 10), 7),  # widths that are no multiple of 8, an odd batch, two hidden layers
])
@pytest.mark.parametrize("nonlinearity", ["sigmoid", "relu"])
def test_the_native_estimate_is_the_torch_estimate(widths, batch, nonlinearity):
    """Three BN members and two plain ones mixed in; on 1, 2 and 3 threads (as many as the BN members)."""
    stack, rows, bits, examples = _trained(widths, (True, True, True, False, False), nonlinearity, batch)
    expected = copy.deepcopy(stack)
    expected.estimate_population([BinaryBatch(bits[index]) for index in examples])
    want = _population(expected)
    found = {}
    for threads in (1, 2, 3):
        native = copy.deepcopy(stack)
        NativeStack(native, threads=threads).estimate_population(examples, rows)
        found[threads] = _population(native)
        assert torch.equal(native.flat, stack.flat)  # frozen: no parameter and no moving average changes
        for name, buffer in native.named_buffers():
            if not name.startswith("pop_"):
                assert torch.equal(buffer, stack.get_buffer(name)), name
    assert int(found[1]["pop_batches"]) == int(want["pop_batches"]) == BATCHES
    for name, theirs in want.items():
        ours = found[1][name]
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        if name != "pop_batches":
            scale = float(theirs.abs().max())  # the layer's largest value (see the module's docstring)
            torch.testing.assert_close(ours, theirs, rtol=4 * ULP, atol=4 * ULP * scale,
                                       msg=lambda message, name=name: f"{name}: {message}")
        # each thread takes whole runs of batches of one member, split alike for any thread count: bit for bit
        assert torch.equal(found[2][name], ours) and torch.equal(found[3][name], ours), name


def test_it_refuses_and_skips_what_the_torch_estimate_does():
    stack, rows, bits, examples = _trained((50, 37, 19, 10), (True, False), "sigmoid", 7)
    engine = NativeStack(stack)
    before = _population(stack)
    message = "population statistics need at least one mini-batch of two or more examples"
    for no_variance in (examples[:, :1], examples[:0]):  # batches of one example; no batch at all
        with pytest.raises(ValueError, match=message):
            stack.estimate_population([BinaryBatch(bits[index]) for index in no_variance])
        with pytest.raises(ValueError, match=message):
            engine.estimate_population(no_variance, rows)
    assert all(torch.equal(buffer, before[name]) for name, buffer in _population(stack).items())  # untouched
    with pytest.raises(ValueError, match="example indices"):
        engine.estimate_population(examples + len(bits), rows)
    with pytest.raises(ValueError, match="features"):
        engine.estimate_population(examples, BinaryRows.of(bits[:, :40]))

    plain, rows, bits, examples = _trained((50, 37, 19, 10), (False, False), "sigmoid", 7)  # no BN: nothing to do
    expected = copy.deepcopy(plain)
    expected.estimate_population([BinaryBatch(bits[index]) for index in examples])
    NativeStack(plain).estimate_population(examples, rows)
    assert int(plain.pop_batches) == int(expected.pop_batches) == 0


def test_an_mnist_run_evaluates_as_with_the_torch_population_pass(fake_mnist, tmp_path, monkeypatch):
    """The native engine's run, with its own population pass and with the torch engine's (``MnistTask``'s): the same
    training bit for bit, and the same evaluations with population statistics to float32 rounding."""
    # every evaluation estimates Alg. 2's statistics, over 23 batches: across epochs (10 batches each)
    settings = dict(overrides=["train.steps=40", "eval.every=20", "eval.population_batches=23",
                               "eval.statistics=population"],
                    seeds=2, data_seed=3, device_name_="cpu", data_dir=fake_mnist, show_progress=False, engine="native")
    calls = []
    native_pass = NativeStack.estimate_population
    monkeypatch.setattr(NativeStack, "estimate_population",
                        lambda self, *args: calls.append(len(args[0])) or native_pass(self, *args))
    native = pd.read_csv(experiment.run(experiment.DEFAULT_VARIANTS, out=tmp_path / "native", **settings) /
                         "metrics.csv")
    assert calls == [23, 23, 23]  # steps 0, 20 and 40, on the kernel
    monkeypatch.setattr(experiment.NativeMnistTask, "estimate_population", experiment.MnistTask.estimate_population)
    with_torch = pd.read_csv(experiment.run(experiment.DEFAULT_VARIANTS, out=tmp_path / "torch", **settings) /
                             "metrics.csv")
    assert calls == [23, 23, 23]  # the torch pass this time
    assert (native.statistics == "population").all() and sorted(set(native.step)) == [0, 20, 40]
    pd.testing.assert_series_equal(native.train_loss, with_torch.train_loss, check_exact=True)
    # inference with statistics equal to ~1 ulp: probe percentiles to ~1e-6 (values of order 1-10)
    accuracy = ["test_accuracy"]
    pd.testing.assert_frame_equal(native.drop(columns=accuracy), with_torch.drop(columns=accuracy), check_exact=False,
                                  rtol=0, atol=1e-5)
    # rounding could flip an argmax: one of the 200 test images moves the accuracy by 0.005
    assert (native.test_accuracy - with_torch.test_accuracy).abs().max() <= 0.0051
