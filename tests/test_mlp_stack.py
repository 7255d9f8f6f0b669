"""MLPStack's hand-written passes against an independent autograd reference; folding; seeds; binary products."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bnrepro.models.binary import BinaryBatch
from bnrepro.models.mlp import MLPStack

WIDTHS = [30, 8, 7, 6, 5]
EPS = 1e-5


def make_stack(seeds, flags, momentum=0.5, init="truncated_normal", widths=WIDTHS, std=0.5):
    return MLPStack(list(seeds), list(widths), batch_norm=list(flags), nonlinearity="sigmoid", init=init,
                    init_std=std, bn_eps=EPS, bn_momentum=momentum)


def make_batch(n=16, seed=0, features=WIDTHS[0], classes=WIDTHS[-1]):
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(n, features, generator=g) > 0.6
    bits[3] = False  # an example with no active input
    bits[:, 0] = False  # a feature no example uses
    return bits, torch.randint(0, classes, (n,), generator=g)


def named(stack: MLPStack, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``flat`` by parameter name, from the stack's declared layout (``shapes``: name -> shape, in order)."""
    sizes = [math.prod(shape) for shape in stack.shapes.values()]
    assert sum(sizes) == flat.numel()
    return {name: part.view(shape) for (name, shape), part in zip(stack.shapes.items(), flat.split(sizes))}


def member_params(stack: MLPStack, params: dict, i: int) -> dict:
    """Member i's weights, BN parameters or biases, cut out of the stack's layout independently."""
    hidden, nb = stack.hidden, stack.normalized
    bn = i < nb
    out = {"W0": params["weight0"][:, i * hidden[0] : (i + 1) * hidden[0]], "bn": bn}
    for layer, width in enumerate(hidden):
        out[f"W{layer + 1}"] = params[f"weight{layer + 1}"][i]
        if bn:
            out[f"gamma{layer}"] = params[f"gamma{layer}"][0, i * width : (i + 1) * width]
            out[f"beta{layer}"] = params[f"beta{layer}"][0, i * width : (i + 1) * width]
        else:
            j = i - nb
            out[f"b{layer}"] = params[f"bias{layer}"][0, j * width : (j + 1) * width]
    classes = stack.widths[-1]
    out["b_out"] = params["bias_out"][0, i * classes : (i + 1) * classes]
    return out


def reference_logits(stack, params, bits, i, train=True, population=None):
    """One member with plain torch ops: x @ W, BN (F.batch_norm) or + b, sigmoid, ..., logits."""
    p = member_params(stack, params, i)
    h = bits.to(params["weight0"].dtype)
    last_pre = None
    for layer in range(len(stack.hidden)):
        z = h @ p[f"W{layer}"]
        if p["bn"]:
            mean, var = (None, None) if train else population(layer, i)
            pre = F.batch_norm(z, mean, var, p[f"gamma{layer}"], p[f"beta{layer}"], training=train, eps=EPS)
        else:
            pre = z + p[f"b{layer}"]
        h, last_pre = torch.sigmoid(pre), pre
    return h @ p[f"W{len(stack.hidden)}"] + p["b_out"], last_pre


FLAG_SETS = [[True, True, False], [False, False], [True], [True, False, False, False]]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_losses_and_gradient_match_autograd(flags):
    stack = make_stack(range(len(flags)), flags).double()
    bits, targets = make_batch()
    weights = torch.arange(1.0, len(flags) + 1, dtype=torch.float64)  # a different upstream gradient per member

    losses = stack.losses(BinaryBatch(bits), targets)
    (losses * weights).sum().backward()

    flat = stack.flat.detach().clone().requires_grad_()
    params = named(stack, flat)
    ref = torch.stack([F.cross_entropy(reference_logits(stack, params, bits, i)[0], targets)
                       for i in range(len(flags))])
    (grad,) = torch.autograd.grad((ref * weights).sum(), flat)

    assert losses.shape == (len(flags),)
    torch.testing.assert_close(losses.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stack.flat.grad, grad, rtol=1e-8, atol=1e-12)
    assert grad.abs().sum() > 0
    for name, part in named(stack, stack.flat.grad).items():  # every named parameter gets its gradient
        if part.numel():
            assert part.abs().sum() > 0, name


def _train_a_little(stack, steps=3, lr=0.5):
    optimizer = torch.optim.SGD([stack.flat], lr=lr)
    for step in range(steps):
        bits, targets = make_batch(seed=100 + step)
        optimizer.zero_grad()
        stack.losses(BinaryBatch(bits), targets).sum().backward()
        optimizer.step()
    return make_batch(n=16)[0].shape[0]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_moving_averages_follow_the_batch_statistics(flags):
    stack = make_stack(range(len(flags)), flags, momentum=1.0).double()
    bits, targets = make_batch(seed=7)
    stack.losses(BinaryBatch(bits), targets)
    assert int(stack.bn_batch) == (len(bits) if stack.normalized else 0)
    params = named(stack, stack.flat.detach())
    for i in range(stack.normalized):
        p = member_params(stack, params, i)
        h = bits.double()
        for layer, width in enumerate(stack.hidden):
            z = h @ p[f"W{layer}"]
            cols = slice(i * width, (i + 1) * width)
            torch.testing.assert_close(getattr(stack, f"mean_avg{layer}")[0, cols], z.mean(0))
            torch.testing.assert_close(getattr(stack, f"var_avg{layer}")[0, cols], z.var(0, unbiased=False))
            h = torch.sigmoid(F.batch_norm(z, None, None, p[f"gamma{layer}"], p[f"beta{layer}"], training=True,
                                           eps=EPS))


def _independent_population(stack, params, batches, i):
    """Alg. 2 for member ``i`` by hand (float64): each batch through the training-mode network, then per layer
    E[x] = mean of mu_B and Var[x] = mean of m/(m-1) sigma2_B (batches of different sizes each with their m)."""
    p = member_params(stack, params, i)
    found = [([], []) for _ in stack.hidden]
    for bits in batches:
        h, m = bits.double(), len(bits)
        for layer in range(len(stack.hidden)):
            z = h @ p[f"W{layer}"]
            found[layer][0].append(z.mean(0))
            found[layer][1].append(z.var(0, unbiased=False) * m / (m - 1))
            h = torch.sigmoid(F.batch_norm(z, None, None, p[f"gamma{layer}"], p[f"beta{layer}"], training=True,
                                           eps=EPS))
    return [(torch.stack(means).mean(0), torch.stack(variances).mean(0)) for means, variances in found]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_predict_uses_the_chosen_statistics_and_the_folded_network_the_population(flags):
    stack = make_stack(range(len(flags)), flags).double()
    m = _train_a_little(stack)
    stack.eval()
    bits, _ = make_batch(n=9, seed=55)
    members, classes = len(flags), WIDTHS[-1]
    params = named(stack, stack.flat.detach())
    averages = {name: buf.clone() for name, buf in stack.named_buffers() if "avg" in name}
    batches = [make_batch(n=n, seed=300 + k)[0] for k, n in enumerate([12, 12, 7])]
    stack.estimate_population([BinaryBatch(b) for b in batches])
    for name, buf in stack.named_buffers():  # estimating leaves the moving averages alone
        if "avg" in name:
            assert torch.equal(buf, averages[name]), name
    independent = [_independent_population(stack, params, batches, i) for i in range(stack.normalized)]

    def moving(layer, i):
        width = stack.hidden[layer]
        cols = slice(i * width, (i + 1) * width)
        mean = getattr(stack, f"mean_avg{layer}")[0, cols]
        var = getattr(stack, f"var_avg{layer}")[0, cols] * m / (m - 1)  # Alg. 2: unbiased
        return mean, var

    predicted = {}
    for statistics, population in (("moving", moving), ("population", lambda layer, i: independent[i][layer])):
        stack.statistics = statistics
        logits, pre = stack.predict(BinaryBatch(bits))
        assert logits.shape == (9, members, classes)
        assert pre.shape == (9, members, WIDTHS[-2])
        for i in range(members):
            want_logits, want_pre = reference_logits(stack, params, bits, i, train=False, population=population)
            torch.testing.assert_close(logits[:, i], want_logits)
            torch.testing.assert_close(pre[:, i], want_pre)
        predicted[statistics] = logits
    if stack.normalized:
        assert not torch.allclose(predicted["moving"][:, 0], predicted["population"][:, 0])

    stack.statistics = "moving"  # folding uses the population statistics whatever inference was last set to
    layers = stack.folded()
    assert len(layers) == len(WIDTHS) - 1
    h = bits.double().unsqueeze(0).expand(members, -1, -1)
    for k, (weight, bias) in enumerate(layers):
        assert weight.shape == (members, WIDTHS[k], WIDTHS[k + 1])
        z = torch.bmm(h, weight) + bias
        h = torch.sigmoid(z) if k < len(layers) - 1 else z
    torch.testing.assert_close(h.transpose(0, 1), predicted["population"])


def test_predict_does_not_touch_the_moving_averages():
    stack = make_stack([0, 1], [True, False]).double()
    _train_a_little(stack)
    before = {name: buf.clone() for name, buf in stack.named_buffers()}
    stack.predict(BinaryBatch(make_batch(seed=3)[0]))
    for name, buf in stack.named_buffers():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("init", ["truncated_normal", "normal"])
def test_member_initialisation_depends_on_its_own_seed_only(init):
    seeds, flags = [11, 5, 7], [True, False, False]
    stack = make_stack(seeds, flags, init=init)
    params = named(stack, stack.flat.detach())
    for i, (seed, flag) in enumerate(zip(seeds, flags)):
        alone = make_stack([seed], [flag], init=init)
        mine, theirs = member_params(stack, params, i), member_params(alone, named(alone, alone.flat.detach()), 0)
        assert mine.keys() == theirs.keys()
        for key in mine:
            if key != "bn":
                assert torch.equal(mine[key], theirs[key]), (i, key)
    again = make_stack(seeds, flags, init=init)
    assert torch.equal(again.flat, stack.flat)
    assert not torch.equal(params["weight1"][1], params["weight1"][2])  # different seeds, different weights


def test_initial_values():
    std = 0.1
    stack = make_stack([0, 1], [True, False], init="truncated_normal", widths=[300, 200, 10], std=std)
    params = named(stack, stack.flat.detach())
    for name in ("weight0", "weight1"):
        w = params[name]
        assert w.abs().max() <= 2 * std + 1e-6
        assert 0.7 * std < w.std() < std  # a 2-std truncation shrinks the std to ~0.88 of the nominal one
    assert torch.all(params["gamma0"] == 1) and torch.all(params["beta0"] == 0)
    assert torch.all(params["bias0"] == 0) and torch.all(params["bias_out"] == 0)


def test_bn_members_must_come_first():
    with pytest.raises(ValueError):
        make_stack([0, 1], [False, True])
    with pytest.raises(ValueError):
        make_stack([0, 1], [True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_batch_products_equal_dense_ones(dtype):
    g = torch.Generator().manual_seed(0)
    bits = torch.rand(9, 13, generator=g) > 0.7
    bits[0] = False  # a row with no active bits
    bits[-1] = False  # ... also the last one (the final, empty bag)
    bits[:, 2] = False  # a column with no active bits
    bits[:, -1] = False  # ... also the last one
    bits[4] = True  # and a full row
    weight = torch.randn(13, 5, generator=g, dtype=dtype)
    grad = torch.randn(9, 5, generator=g, dtype=dtype)
    batch = BinaryBatch(bits)
    assert batch.shape == (9, 13)
    torch.testing.assert_close(batch.matmul(weight), bits.to(dtype) @ weight)
    torch.testing.assert_close(batch.t_matmul(grad), bits.to(dtype).T @ grad)


def test_binary_batch_all_zero():
    batch = BinaryBatch(torch.zeros(4, 6, dtype=torch.bool))
    assert torch.equal(batch.matmul(torch.randn(6, 3)), torch.zeros(4, 3))
    assert torch.equal(batch.t_matmul(torch.randn(4, 3)), torch.zeros(6, 3))


def test_binary_batch_accepts_uint8_bits():
    bits = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.uint8)
    weight = torch.arange(6.0).view(3, 2)
    torch.testing.assert_close(BinaryBatch(bits).matmul(weight), bits.float() @ weight)
