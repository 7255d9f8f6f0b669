"""The native kernel's flush of subnormal floats (``FlushDenormals`` in bnrepro/native/mlp.cpp).

Why: in the sweep's saturated corner the kernel made millions of subnormal values (saturated sigmoids, softmax terms,
their gradients), and on x86 each operation on one takes a microcode assist (issue 23). While a kernel runs, its
threads now flush them to zero (FTZ) and read them as zero (DAZ). Checked here: the caller's floating-point mode is
as it was after every kernel; in the ordinary and in a saturated regime the kernel with the flush gives the same bits
as the kernel built without it (``BNREPRO_KEEP_DENORMALS``), and results equal to the torch engine's to the
tolerance tests/test_native.py holds the two engines to; and exactly what the flush does change, where a subnormal
sigmoid output meets a weight near 1e38. And ``native.defined``, which builds that variant, leaves the package's own
build (and its cache key) as it was.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_native import _data, _stack, _torch_steps

from bnrepro import native
from bnrepro.models.binary import BinaryBatch
from bnrepro.models.mlp import MLPStack
from bnrepro.models.mlp_native import BinaryRows, NativeStack

pytestmark = pytest.mark.usefixtures("native_engine")

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")  # where the kernel flushes
TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.1754944e-38


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < TINY)).sum())


def _flushing() -> bool:
    """Whether this thread flushes subnormals now: a quotient that should be subnormal survives only where it does
    not. torch's float32 and Python's float64 agree (both are SSE arithmetic on x86, under the thread's MXCSR)."""
    tiny, ten = 1e-310, 10.0  # names, not literals: Python would fold a constant quotient when compiling
    flushes = bool((torch.tensor([1e-38]) / 10 == 0).item())
    assert flushes == (tiny / ten == 0)
    return flushes


@pytest.fixture
def unflushed() -> Callable[..., NativeStack]:
    """A ``NativeStack`` on the kernel built with the flush compiled out: the arithmetic before issue 23."""

    def make(stack: MLPStack, threads: int | None = None) -> NativeStack:
        with native.defined("BNREPRO_KEEP_DENORMALS"):
            return NativeStack(stack, threads)  # binds the kernel's functions now

    return make


def test_a_defined_variant_is_cached_apart_and_the_package_build_comes_back():
    """``native.defined`` changes which build ``library`` gives only inside its block, however the block ends; the
    package's own build keeps its cache key (the libraries cached before ``DEFINES`` existed stay valid)."""
    compiler, source, package = native.build_paths("mlp")
    package_library = native.library("mlp")
    with native.defined("BNREPRO_KEEP_DENORMALS"):
        assert native.DEFINES == ("BNREPRO_KEEP_DENORMALS",)
        inside = native.build_paths("mlp")
        assert inside[:2] == (compiler, source) and inside[2] != package
        assert Path(native.library("mlp")._name).resolve() == inside[2].resolve()
    assert native.DEFINES == ()
    assert native.build_paths("mlp") == (compiler, source, package)
    # resolved: each test's cache links one shared folder of builds, so an earlier test's loaded path names the file too
    loaded = {Path(lib._name).resolve() for lib in (native.library("mlp"), package_library)}
    assert loaded == {package.resolve()}
    with pytest.raises(KeyError), native.defined("BNREPRO_KEEP_DENORMALS", "BNREPRO_PART_TIMES"):
        assert native.build_paths("mlp")[2] not in (package, inside[2])
        raise KeyError("a block that fails")
    assert native.DEFINES == () and native.build_paths("mlp")[2] == package
    with pytest.raises(ValueError, match="not a macro"), native.defined("-O0"):
        pass
    assert native.DEFINES == ()


@pytest.mark.skipif(not X86, reason="the kernel sets no flush outside x86")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_callers_floating_point_mode_is_as_before_every_kernel(threads):
    stack = _stack()
    engine, (bits, labels) = NativeStack(stack, threads=threads), _data(784, 10)
    rows, examples = BinaryRows.of(bits), torch.randint(0, len(bits), (3, 60))
    calls = [lambda: engine.train_steps(examples, rows, labels, [0.5] * 3), lambda: engine.predict(rows, 0),
             lambda: engine.estimate_population(examples, rows)]
    assert not _flushing()
    for call in calls:
        call()
        assert not _flushing()
    if not torch.set_flush_denormal(True):  # a caller that flushes itself keeps flushing
        pytest.skip("torch cannot set the flush here")
    try:
        assert _flushing()
        for call in calls:
            call()
            assert _flushing()
    finally:
        torch.set_flush_denormal(False)
    assert not _flushing()


def _saturated_stack() -> MLPStack:
    """``_stack``'s four members, three of them saturated: every other hidden unit of BN member 1 and of plain
    member 3 shifted to -88 (sigmoid outputs around 6e-39, subnormal), plain member 2's first weights x100 (inputs
    to its first sigmoids spread over +-100); member 0 as it is."""
    stack = _stack()
    with torch.no_grad():
        params = stack.unflatten(stack.flat)
        params.weights[0][:, 200:300].mul_(100.0)
        for shift in (*params.beta, *params.bias):
            shift.view(2, -1)[1, ::2] = -88.0
    return stack


@pytest.mark.parametrize("regime", ["ordinary", "saturated"])
def test_the_flush_changes_no_bit_and_both_engines_agree(regime, unflushed):
    """Where every value stays normal (the ordinary regime) the flush cannot act. In the saturated one the torch
    engine makes thousands of subnormal activations and parameter gradients a step, yet each lies below the rounding
    of what it is added to: the same bits with and without the flush, and the engines agree as in test_native.py."""
    stack = _stack() if regime == "ordinary" else _saturated_stack()
    bits, labels = _data(784, 10)
    examples = torch.stack([torch.randperm(len(bits), generator=torch.Generator().manual_seed(s))[:60]
                            for s in range(15)])
    probe = copy.deepcopy(stack)  # the torch engine's activations and gradients on the first mini-batch
    _, caches, _ = probe.forward_pass(probe.unflatten(probe.flat.detach()), BinaryBatch(bits[examples[0]]), True)
    probe.losses(BinaryBatch(bits[examples[0]]), labels[examples[0]]).sum().backward()
    activations, gradients = sum(_subnormals(h) for h, _ in caches), _subnormals(probe.flat.grad)
    if regime == "ordinary":
        assert activations == gradients == 0
    else:  # measured: 11,959 of 72,000 sigmoid outputs, 100,519 parameter gradients
        assert activations > 5_000 and gradients > 50_000

    reference = copy.deepcopy(stack)
    expected = _torch_steps(reference, bits, labels, examples, lr=0.5)
    flushed, kept = copy.deepcopy(stack), copy.deepcopy(stack)
    rows = BinaryRows.of(bits)
    losses = NativeStack(flushed).train_steps(examples, rows, labels, [0.5] * len(examples))
    kept_losses = unflushed(kept).train_steps(examples, rows, labels, [0.5] * len(examples))
    assert losses.isfinite().all() and flushed.flat.isfinite().all()
    assert torch.equal(losses, kept_losses) and torch.equal(flushed.flat, kept.flat)
    assert all(torch.equal(a, b) for a, b in zip(flushed.buffers(), kept.buffers()))
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(flushed.flat, reference.flat, rtol=0, atol=1e-5)
    for ours, theirs in zip(flushed.buffers(), reference.buffers()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    population = torch.randint(0, len(bits), (20, 60), generator=torch.Generator().manual_seed(7))
    NativeStack(flushed).estimate_population(population, rows)  # evaluation: Alg. 2's pass, then inference
    unflushed(kept).estimate_population(population, rows)
    reference.estimate_population([BinaryBatch(bits[index]) for index in population])
    assert all(torch.equal(a, b) for a, b in zip(flushed.buffers(), kept.buffers()))
    for evaluated in (flushed, kept, reference):
        evaluated.statistics = "population"
    logits, pre = reference.predict(BinaryBatch(bits))
    native_logits, probe_pre = NativeStack(flushed).predict(rows, probe_unit=3)
    assert all(torch.equal(a, b) for a, b in zip((native_logits, probe_pre), unflushed(kept).predict(rows, 3)))
    torch.testing.assert_close(native_logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(probe_pre, pre[:, :, 3], rtol=0, atol=1e-5)


@pytest.mark.skipif(not X86, reason="the kernel sets no flush outside x86")
@pytest.mark.parametrize("threads", [1, 2])
def test_exactly_what_the_flush_changes_on_every_thread(unflushed, threads):
    """A subnormal counts as 0. sigmoid(-88) = 6.05e-39 is subnormal: the torch engine, and the kernel without the
    flush, keep it; the kernel reads it as 0. Only a factor near 1e38 makes that visible in a result: here every
    second-layer weight is 1e38, so each logit is 8 x 6.05e-39 x 1e38 = 4.84 there, and 0 on the kernel. Two members
    on one thread, then on two: the kernel's worker thread flushes as its calling thread does."""
    stack = _stack(widths=(30, 8, 8), batch_norm=(False, False))
    with torch.no_grad():
        params = stack.unflatten(stack.flat)
        params.weights[0].zero_()
        params.bias[0].fill_(-88.0)
        params.weights[1].fill_(1e38)
    stack.eval()
    bits, _ = _data(30, 8, n=5)
    expected, _ = stack.predict(BinaryBatch(bits))
    torch.testing.assert_close(expected, torch.full_like(expected, 4.84), rtol=2e-3, atol=0)
    kept, _ = unflushed(stack, threads=threads).predict(BinaryRows.of(bits), probe_unit=0)
    torch.testing.assert_close(kept, expected, rtol=1e-5, atol=0)
    flushed, _ = NativeStack(stack, threads=threads).predict(BinaryRows.of(bits), probe_unit=0)
    assert torch.equal(flushed, torch.zeros_like(expected))
