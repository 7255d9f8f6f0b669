"""The native MNIST engine (bnrepro/native/mlp.cpp) against the torch engine, which autograd checks."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bnrepro import native
from bnrepro.errors import UserError
from bnrepro.experiments import mnist as experiment
from bnrepro.models.binary import BinaryBatch
from bnrepro.models.mlp import MLPStack
from bnrepro.models.mlp_native import BinaryRows, NativeStack, unsupported

pytestmark = pytest.mark.usefixtures("native_engine")


def _stack(widths=(784, 100, 100, 100, 10), batch_norm=(True, True, False, False), nonlinearity="sigmoid"):
    return MLPStack(list(range(len(batch_norm))), list(widths), batch_norm=list(batch_norm),
                    nonlinearity=nonlinearity, init="truncated_normal", init_std=0.1, bn_eps=1e-5, bn_momentum=0.1)


def _data(inputs: int, classes: int, n: int = 300, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    bits = torch.rand(n, inputs, generator=generator) < 0.15
    return bits, torch.randint(0, classes, (n,), generator=generator)


def _torch_steps(stack: MLPStack, bits, labels, examples, lr: float) -> torch.Tensor:
    optimizer = torch.optim.SGD([stack.flat], lr=lr)
    losses = []
    for index in examples:
        loss = stack.losses(BinaryBatch(bits[index]), labels[index])
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("widths, batch, nonlinearity", [
    ((784, 100, 100, 100, 10), 60, "sigmoid"),  # the paper's network
    ((784, 100, 100, 100, 10), 60, "relu"),
    ((50, 37, 19, 10), 7, "sigmoid"),  # widths that are no multiple of 8, an odd batch, two hidden layers
    ((30, 8, 8), 5, "sigmoid"),  # the narrowest the kernel takes, one hidden layer
])
def test_native_steps_match_the_torch_engine(widths, batch, nonlinearity):
    torch_stack = _stack(widths, nonlinearity=nonlinearity)
    native_stack = copy.deepcopy(torch_stack)
    bits, labels = _data(widths[0], widths[-1])
    examples = torch.stack([torch.randperm(len(bits), generator=torch.Generator().manual_seed(s))[:batch]
                            for s in range(15)])
    expected = _torch_steps(torch_stack, bits, labels, examples, lr=0.5)
    losses = NativeStack(native_stack).train_steps(examples, BinaryRows.of(bits), labels, [0.5] * len(examples))
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(native_stack.flat, torch_stack.flat, rtol=0, atol=1e-5)
    for ours, theirs in zip(native_stack.buffers(), torch_stack.buffers()):  # BN moving averages, m
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    torch_stack.eval()
    logits, pre = torch_stack.predict(BinaryBatch(bits))
    native_logits, probe = NativeStack(native_stack).predict(BinaryRows.of(bits), probe_unit=3)
    torch.testing.assert_close(native_logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(probe, pre[:, :, 3], rtol=0, atol=1e-5)


def test_results_depend_on_neither_threads_nor_chunks():
    """Each member is trained by one thread, step after step, so the arithmetic is fixed: bit for bit."""
    bits, labels = _data(784, 10)
    rows, examples = BinaryRows.of(bits), torch.randint(0, len(bits), (12, 60))
    one, two = _stack(), _stack()
    losses_one = NativeStack(one, threads=1).train_steps(examples, rows, labels, [0.3] * 12)
    engine = NativeStack(two, threads=2)
    losses_two = torch.cat([engine.train_steps(examples[:5], rows, labels, [0.3] * 5),
                            engine.train_steps(examples[5:], rows, labels, [0.3] * 7)])
    assert torch.equal(losses_one, losses_two)
    assert torch.equal(one.flat, two.flat)
    assert all(torch.equal(a, b) for a, b in zip(one.buffers(), two.buffers()))
    single = _stack(batch_norm=(True,))  # inference with more threads than members: they share its examples
    NativeStack(single).train_steps(examples[:2], rows, labels, [0.3] * 2)
    for ours, theirs in zip(NativeStack(single, threads=1).predict(rows, 5),
                            NativeStack(single, threads=3).predict(rows, 5)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("widths", [(784, 100, 100, 100, 10), (50, 300, 19, 10), (60, 256, 16, 10), (40, 16, 12),
                                    (30, 8, 8)])
def test_the_first_layer_by_feature_gives_the_bits_of_by_example(widths):
    """The first layer (training, Alg. 2's population pass, inference) sums weight rows example by example, or adds
    each weight row to the examples that have its feature on (BNREPRO_BY_FEATURE; by default the kernel picks by the
    CPU): for every example the same additions in the same order, so the same bits. Widths: the paper's, several
    column blocks of 128 with a ragged last one and with whole ones, a whole number of 16-lane vectors, the
    narrowest the kernel takes;
    300 examples are inference blocks of 128, 128 and 44."""
    bits, labels = _data(widths[0], widths[-1])
    rows = BinaryRows.of(bits)
    examples = torch.stack([torch.randperm(len(bits), generator=torch.Generator().manual_seed(s))[:60]
                            for s in range(15)])
    results = []
    for by_feature in (0, 1):
        stack = _stack(widths)
        with native.defined(f"BNREPRO_BY_FEATURE={by_feature}"):
            engine = NativeStack(stack)  # binds this build's functions
        losses = engine.train_steps(examples, rows, labels, [0.5] * len(examples))
        engine.estimate_population(examples[:5], rows)  # Alg. 2's pass, into the BN buffers
        stack.statistics = "population"
        results.append([losses, stack.flat.detach().clone(), *[b.clone() for b in stack.buffers()],
                        *engine.predict(rows, probe_unit=3)])
    assert results[0][0].isfinite().all()
    assert all(torch.equal(a, b) for a, b in zip(*results))  # losses, weights, BN buffers, logits, probe


def test_a_diverging_member_turns_nan_alone():
    stack = _stack(batch_norm=(True, False))
    bits, labels = _data(784, 10)
    with torch.no_grad():
        stack.unflatten(stack.flat).weights[1][1].fill_(float("nan"))  # the plain member's second layer
    losses = NativeStack(stack).train_steps(torch.randint(0, len(bits), (3, 60)), BinaryRows.of(bits), labels,
                                            [0.5] * 3)
    assert losses[:, 0].isfinite().all() and losses[:, 1].isnan().all()


def test_the_engine_says_what_it_cannot_run():
    stack = _stack()
    sgd = torch.optim.SGD([stack.flat], lr=0.1)
    assert unsupported(stack, torch.device("cpu"), sgd) is None
    assert "CPU" in unsupported(stack, torch.device("meta"), sgd)
    assert "momentum" in unsupported(stack, torch.device("cpu"), torch.optim.SGD([stack.flat], lr=0.1, momentum=0.9))
    assert "8 wide" in unsupported(_stack((20, 6, 10)), torch.device("cpu"), sgd)
    assert "hidden layer" in unsupported(_stack((20, 10), batch_norm=(False,)), torch.device("cpu"), sgd)


@pytest.fixture
def no_compiler(monkeypatch):
    def missing():
        raise native.Unavailable("no C++ compiler found (set CXX, or install g++ or clang++)")

    native.library.cache_clear()
    monkeypatch.setattr(native, "_compiler", missing)
    yield
    native.library.cache_clear()


def test_without_a_compiler_auto_falls_back_to_torch_and_says_so(fake_mnist, tmp_path, no_compiler):
    run_dir = experiment.run(experiment.DEFAULT_VARIANTS, ["train.steps=20", "eval.every=10"], 1, 0, "cpu", tmp_path,
                             fake_mnist, show_progress=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["engine"].startswith("torch (native: no C++ compiler found")
    with pytest.raises(UserError, match="native engine cannot train this run: no C\\+\\+ compiler"):
        experiment.run(experiment.DEFAULT_VARIANTS, [], 1, 0, "cpu", tmp_path, fake_mnist, engine="native")


@pytest.mark.parametrize("script, message", [
    ("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n", "this compiler is broken"),
    ("#!/nonexistent/interpreter\n", "cannot build or load"),  # it cannot even start
])
def test_a_compiler_that_fails_makes_the_engine_unavailable(tmp_path, monkeypatch, script, message):
    fake = tmp_path / "c++"
    fake.write_text(script)
    fake.chmod(0o755)
    native.library.cache_clear()
    monkeypatch.setenv("CXX", str(fake))
    try:
        with pytest.raises(native.Unavailable, match=message):
            native.library("mlp")
    finally:
        native.library.cache_clear()


def test_both_engines_give_the_same_mnist_run(fake_mnist, tmp_path):
    """The whole experiment, native vs torch: the same curves to float32 rounding."""
    settings = dict(overrides=["train.steps=200", "eval.every=50"], seeds=2, data_seed=3, device_name_="cpu",
                    data_dir=fake_mnist, show_progress=False)
    runs = {engine: experiment.run(experiment.DEFAULT_VARIANTS, out=tmp_path / engine, engine=engine, **settings)
            for engine in ("torch", "native")}
    import pandas as pd

    torch_metrics, native_metrics = (pd.read_csv(runs[e] / "metrics.csv") for e in ("torch", "native"))
    # rounding may flip an argmax: one of the 200 test images moves the accuracy by 0.005
    accuracy = ["test_accuracy"]
    pd.testing.assert_frame_equal(native_metrics.drop(columns=accuracy), torch_metrics.drop(columns=accuracy),
                                  check_exact=False, rtol=0, atol=1e-4)
    assert (native_metrics["test_accuracy"] - torch_metrics["test_accuracy"]).abs().max() <= 0.0051
    assert json.loads((runs["native"] / "manifest.json").read_text())["engine"] == "native"


def test_indices_the_kernel_would_trust_are_checked_first():
    stack = _stack(batch_norm=(True,))
    engine, (bits, labels) = NativeStack(stack), _data(784, 10)
    rows, examples = BinaryRows.of(bits), torch.zeros(1, 60, dtype=torch.int64)
    with pytest.raises(ValueError, match="example indices"):
        engine.train_steps(examples + len(bits), rows, labels, [0.1])
    with pytest.raises(ValueError, match="labels must lie"):
        engine.train_steps(examples, rows, labels + 10, [0.1])
    with pytest.raises(ValueError, match="learning rates"):
        engine.train_steps(examples, rows, labels, [0.1, 0.1])
    with pytest.raises(ValueError, match="features"):
        engine.predict(BinaryRows.of(bits[:, :500]), probe_unit=0)


def test_a_damaged_cached_library_is_built_again(isolated_cache, monkeypatch):
    native.library.cache_clear()
    monkeypatch.setattr(native, "cache_dir", lambda: isolated_cache / "own")  # not the session's shared builds
    _, _, target = native.build_paths("mlp")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a shared library")  # as a disk-full or killed copy would leave it
    try:
        assert native.library("mlp").bnrepro_mlp_train is not None
        assert target.stat().st_size > 1000
    finally:
        native.library.cache_clear()
