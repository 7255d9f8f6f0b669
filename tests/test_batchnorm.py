"""The project's own BN (Alg. 1 and 2) against torch.nn.functional.batch_norm, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnrepro.models.batchnorm import (
    BatchNorm,
    batch_norm_train,
    estimate_population,
    fold_linear,
    inference_affine,
    population,
    use_statistics,
)

EPS = 1e-5
LAYOUTS = {
    "2d": ((32, 6), (0,), (1, 6)),
    "4d": ((8, 5, 4, 3), (0, 2, 3), (1, 5, 1, 1)),
}


def _inputs(layout: str, seed: int = 0):
    size, dims, shape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(size, generator=g, dtype=torch.float64) * 3 + 1.5).requires_grad_()
    gamma = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    return x, gamma, beta, dims, shape


def _reference(x, gamma, beta, training=True, running_mean=None, running_var=None):
    """torch's batch norm with our (1, C, ...) parameters flattened to (C,)."""
    return F.batch_norm(x, running_mean, running_var, gamma.reshape(-1), beta.reshape(-1), training=training,
                        eps=EPS)


def _biased_stats(x, dims):
    return x.mean(dims, keepdim=True), x.var(dims, keepdim=True, unbiased=False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_and_backward_match_torch(layout):
    x, gamma, beta, dims, _ = _inputs(layout)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    y, mean, var = batch_norm_train(x, gamma, beta, dims, EPS)
    grads = torch.autograd.grad((y * upstream).sum(), (x, gamma, beta))

    y_ref = _reference(x, gamma, beta)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), (x, gamma, beta))

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    mean_ref, var_ref = _biased_stats(x.detach(), dims)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)  # Alg. 1 normalizes with the biased variance


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_normalizes_with_the_biased_variance(layout):
    x, gamma, beta, dims, _ = _inputs(layout)
    y, _, var = batch_norm_train(x, gamma, beta, dims, EPS)
    m = x.numel() // gamma.numel()
    x = x.detach()
    biased = ((x - x.mean(dims, keepdim=True)) ** 2).sum(dims, keepdim=True) / m
    torch.testing.assert_close(var, biased)
    expected = gamma * (x - x.mean(dims, keepdim=True)) / torch.sqrt(biased + EPS) + beta
    torch.testing.assert_close(y, expected)
    # and the normalized values have (biased) variance ~1: with the unbiased estimate it would be (m-1)/m
    x_hat = (y - beta) / gamma
    torch.testing.assert_close(x_hat.var(dims, unbiased=False), torch.ones_like(x_hat.var(dims)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck(layout):
    size, dims, shape = LAYOUTS[layout]
    small = (6, 3) if layout == "2d" else (3, 2, 2, 2)
    shape = (1, small[1]) + (1,) * (len(small) - 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(small, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: batch_norm_train(a, b, c, dims, 1e-3)[0], (x, gamma, beta))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_module_forward_backward_matches_torch(layout):
    torch.manual_seed(0)
    x, _, _, dims, shape = _inputs(layout)
    bn = BatchNorm(shape, dims, eps=EPS, momentum=0.1).double()
    with torch.no_grad():
        bn.gamma.copy_(torch.rand(shape, dtype=torch.float64) + 0.5)
        bn.beta.copy_(torch.randn(shape, dtype=torch.float64))
    torch_bn = (nn.BatchNorm1d if layout == "2d" else nn.BatchNorm2d)(shape[1], eps=EPS).double()
    with torch.no_grad():
        torch_bn.weight.copy_(bn.gamma.reshape(-1))
        torch_bn.bias.copy_(bn.beta.reshape(-1))
    x2 = x.detach().clone().requires_grad_()
    y, y_ref = bn(x), torch_bn(x2)
    torch.testing.assert_close(y, y_ref)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bn.gamma.grad.reshape(-1), torch_bn.weight.grad)
    torch.testing.assert_close(bn.beta.grad.reshape(-1), torch_bn.bias.grad)
    assert bn.gamma.grad.shape == shape


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_fused_kernel_is_the_closed_form(layout, memory_format):
    """Training runs on torch's fused kernel; the project's closed form of Alg. 1 and Sec. 3.1 is the reference
    it is held to (float64): output, the three gradients and the moving averages, over several steps."""
    if layout == "2d" and memory_format is torch.channels_last:
        pytest.skip("channels_last is a 4-d layout")
    _, dims, shape = LAYOUTS[layout]
    fused, closed = (BatchNorm(shape, dims, eps=EPS, momentum=0.3).double() for _ in range(2))
    closed.fused = False
    assert fused.fused
    with torch.no_grad():
        for bn in (fused, closed):
            bn.gamma.copy_(torch.linspace(0.5, 1.5, shape[1], dtype=torch.float64).view(shape))
            bn.beta.copy_(torch.linspace(-1, 1, shape[1], dtype=torch.float64).view(shape))
    for seed in range(3):
        x, *_ = _inputs(layout, seed=10 + seed)
        x = x.detach().contiguous(memory_format=memory_format) if x.ndim == 4 else x.detach()
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        found = []
        for bn in (fused, closed):
            xi = x.clone().requires_grad_()
            y = bn(xi)
            grads = torch.autograd.grad((y * upstream).sum(), (xi, bn.gamma, bn.beta))
            found.append((y, *grads))
        for got, want in zip(*found):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(fused.mean_avg, closed.mean_avg, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(fused.var_avg, closed.var_avg, rtol=1e-12, atol=1e-13)


def test_shape_must_have_size_one_at_reduced_dims():
    with pytest.raises(ValueError):
        BatchNorm((4, 6), (0,), eps=EPS, momentum=0.1)


def _trained(layout: str, momentum: float, batches: int = 3):
    _, dims, shape = LAYOUTS[layout]
    torch.manual_seed(1)
    bn = BatchNorm(shape, dims, eps=EPS, momentum=momentum).double()
    with torch.no_grad():
        bn.gamma.copy_(torch.rand(shape, dtype=torch.float64) + 0.5)
        bn.beta.copy_(torch.randn(shape, dtype=torch.float64))
    seen = []
    for seed in range(batches):
        x, *_ = _inputs(layout, seed=10 + seed)
        x = x.detach()
        seen.append(x)
        bn.train()
        bn(x)
    return bn, seen, dims


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_population_variance_is_unbiased(layout):
    """Alg. 2: Var[x] = m/(m-1) E_B[sigma_B^2]; with momentum 1 the averages are the last batch's statistics."""
    bn, seen, dims = _trained(layout, momentum=1.0)
    last = seen[-1]
    m = last.numel() // bn.gamma.numel()
    mean_b, var_b = _biased_stats(last, dims)
    torch.testing.assert_close(bn.mean_avg, mean_b)
    torch.testing.assert_close(bn.var_avg, var_b * m / (m - 1))  # kept unbiased, torch's convention
    scale, shift = bn.affine()
    want_scale = bn.gamma / torch.sqrt(m / (m - 1) * var_b + EPS)
    torch.testing.assert_close(scale, want_scale)
    torch.testing.assert_close(shift, bn.beta - mean_b * want_scale)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_moving_averages(layout):
    momentum = 0.3
    bn, seen, dims = _trained(layout, momentum=momentum)
    mean, var = torch.zeros_like(bn.mean_avg), torch.ones_like(bn.var_avg)
    for x in seen:
        mean_b, var_b = _biased_stats(x, dims)
        m = x.numel() // mean_b.numel()
        mean, var = (1 - momentum) * mean + momentum * mean_b, (1 - momentum) * var + momentum * var_b * m / (m - 1)
    torch.testing.assert_close(bn.mean_avg, mean)
    torch.testing.assert_close(bn.var_avg, var)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_mode_matches_torch_with_population_statistics(layout):
    bn, seen, dims = _trained(layout, momentum=1.0)
    last = seen[-1]
    m = last.numel() // bn.gamma.numel()
    mean_b, var_b = _biased_stats(last, dims)
    bn.eval()
    x, *_ = _inputs(layout, seed=99)
    x = x.detach()
    y = bn(x)
    y_ref = _reference(x, bn.gamma.detach(), bn.beta.detach(), training=False,
                       running_mean=mean_b.reshape(-1), running_var=(var_b * m / (m - 1)).reshape(-1))
    torch.testing.assert_close(y, y_ref)
    # eval mode neither uses nor changes the batch statistics
    before = bn.mean_avg.clone(), bn.var_avg.clone()
    torch.testing.assert_close(bn(x[:2]), y[:2])
    assert torch.equal(bn.mean_avg, before[0]) and torch.equal(bn.var_avg, before[1])


def test_inference_affine_formula():
    gamma, beta = torch.tensor([[2.0, 0.5]], dtype=torch.float64), torch.tensor([[0.1, -1.0]], dtype=torch.float64)
    mean, var = torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor([[4.0, 0.25]], dtype=torch.float64)
    scale, shift = inference_affine(gamma, beta, *population(mean, var, 5), 0.0)
    unbiased = var * 5 / 4
    torch.testing.assert_close(scale, gamma / unbiased.sqrt())
    torch.testing.assert_close(shift, beta - mean * gamma / unbiased.sqrt())


def _linear_and_bn(bias: bool):
    torch.manual_seed(0)
    linear = nn.Linear(7, 4, bias=bias).double()
    bn = BatchNorm((1, 4), (0,), eps=EPS, momentum=0.5).double()
    with torch.no_grad():
        bn.gamma.copy_(torch.rand(1, 4, dtype=torch.float64) + 0.5)
        bn.beta.copy_(torch.randn(1, 4, dtype=torch.float64))
        for _ in range(3):
            bn(linear(torch.randn(16, 7, dtype=torch.float64) * 2 + 1))
    bn.eval()
    return linear, bn


def test_fold_linear_in_input_by_output_layout():
    """The layout MLPStack uses: W (in, out), scale/shift (1, out), bias (out,)."""
    linear, bn = _linear_and_bn(bias=True)
    x = torch.randn(10, 7, dtype=torch.float64)
    want = bn(linear(x)).detach()
    scale, shift = bn.affine()
    weight, bias = fold_linear(linear.weight.detach().T, linear.bias.detach(), scale, shift)
    torch.testing.assert_close(x @ weight + bias, want)


def test_fold_linear_in_torch_layout_without_bias():
    """nn.Linear's layout, W (out, in): scale as a column; no bias before BN (Sec. 3.2 drops it)."""
    linear, bn = _linear_and_bn(bias=False)
    x = torch.randn(10, 7, dtype=torch.float64)
    want = bn(linear(x)).detach()
    scale, shift = bn.affine()
    weight, bias = fold_linear(linear.weight.detach(), None, scale.view(-1, 1), shift.view(-1))
    assert weight.shape == linear.weight.shape
    torch.testing.assert_close(x @ weight.T + bias, want)


def test_fold_linear_in_torch_layout_with_bias():
    linear, bn = _linear_and_bn(bias=True)
    x = torch.randn(10, 7, dtype=torch.float64)
    want = bn(linear(x)).detach()
    scale, shift = bn.affine()
    weight, bias = fold_linear(linear.weight.detach(), linear.bias.detach(), scale.view(-1, 1), shift.view(-1))
    assert bias.shape == (4,)
    torch.testing.assert_close(F.linear(x, weight, bias), want)


def _sync_worker(rank: int, world: int, port: int, results) -> None:
    """One replica: BN over its half of the batch, statistics synchronised with the other replica."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, weight, gamma, beta = _sync_inputs()
    part = slice(rank * 4, rank * 4 + 4)
    leaves = [t.clone().requires_grad_() for t in (x[part], gamma, beta)]
    y, mean, var = batch_norm_train(*leaves, (0, 2, 3), 1e-3, sync=True)
    (y * weight[part]).sum().backward()  # this replica's share of the loss
    grad_gamma, grad_beta = leaves[1].grad.clone(), leaves[2].grad.clone()
    for grad in (grad_gamma, grad_beta):
        dist.all_reduce(grad)  # what DDP does with parameter gradients (up to its averaging)
    tensors = (y.detach(), leaves[0].grad, grad_gamma, grad_beta, mean, var)
    results.put((rank, *(t.numpy().copy() for t in tensors)))  # by value: shared-memory tensors would race exit
    dist.destroy_process_group()


def _sync_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 3, 3, generator=generator, dtype=torch.float64) * 3 + 1
    weight = torch.randn(8, 5, 3, 3, generator=generator, dtype=torch.float64)
    gamma, beta = (torch.randn(1, 5, 1, 1, generator=generator, dtype=torch.float64) for _ in range(2))
    return x, weight, gamma, beta


def test_synchronised_bn_over_two_processes_equals_bn_over_the_whole_batch():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_sync_worker, args=(rank, 2, port, results)) for rank in range(2)]
    for p in processes:
        p.start()
    found = {item[0]: [torch.from_numpy(a) for a in item[1:]] for item in (results.get(timeout=120) for _ in processes)}
    for p in processes:
        p.join(timeout=60)
    x, weight, gamma, beta = _sync_inputs()
    leaves = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    y, mean, var = batch_norm_train(*leaves, (0, 2, 3), 1e-3)
    (y * weight).sum().backward()
    for rank, (y_part, grad_x, grad_gamma, grad_beta, mean_r, var_r) in found.items():
        part = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(y_part, y.detach()[part])
        torch.testing.assert_close(grad_x, leaves[0].grad[part])
        torch.testing.assert_close(grad_gamma, leaves[1].grad)
        torch.testing.assert_close(grad_beta, leaves[2].grad)
        torch.testing.assert_close(mean_r, mean)
        torch.testing.assert_close(var_r, var)


class _TwoBN(nn.Module):
    """conv -> BN -> relu -> dropout -> BN over features: the second BN's input depends on the first's batch
    statistics, so Alg. 2 must pass each batch through the training-mode network, not the inference one."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = BatchNorm((1, 4, 1, 1), (0, 2, 3), eps=EPS, momentum=0.1)
        self.drop = nn.Dropout(0.5)
        self.bn2 = BatchNorm((1, 4), (0,), eps=EPS, momentum=0.1)

    def forward(self, x):
        return self.bn2(self.drop(torch.relu(self.bn1(self.conv(x)))).mean((2, 3)))


def _independent_population(net: _TwoBN, batches: list[torch.Tensor]):
    """Alg. 2 by hand in float64: per batch the biased statistics of each BN's input, with every BN using its
    batch's own statistics and dropout off; then E[x] = mean of mu_B, Var[x] = mean of m/(m-1) sigma2_B."""
    def normalize(z, dims):
        mean, var = z.mean(dims, keepdim=True), z.var(dims, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + EPS), mean, var, z.numel() // mean.numel()

    found = {1: [], 2: []}
    for x in batches:
        z1 = net.conv(x)
        h, mean, var, m = normalize(z1, (0, 2, 3))
        found[1].append((mean, var * m / (m - 1)))
        z2 = torch.relu(h * net.bn1.gamma + net.bn1.beta).mean((2, 3))
        _, mean, var, m = normalize(z2, (0,))
        found[2].append((mean, var * m / (m - 1)))
    return {k: (torch.stack([a for a, _ in v]).mean(0), torch.stack([b for _, b in v]).mean(0))
            for k, v in found.items()}


@pytest.mark.parametrize("sizes", [[6, 6, 6, 6], [6, 3, 8, 2]], ids=["constant", "varying"])
def test_population_statistics_equal_an_independent_computation(sizes):
    torch.manual_seed(0)
    net = _TwoBN().double()
    with torch.no_grad():
        net.bn1.gamma.uniform_(0.5, 2)
        net.bn1.beta.uniform_(-1, 1)
    batches = [torch.randn(n, 3, 5, 5, dtype=torch.float64) * 2 + 1 for n in sizes]
    params = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("bn") or "avg" in k}
    net.train()

    def forward():
        for x in batches:
            net(x)

    assert estimate_population(net, forward) == len(sizes)
    want = _independent_population(net, batches)
    for k, bn in ((1, net.bn1), (2, net.bn2)):
        torch.testing.assert_close(bn.pop_mean, want[k][0].view(bn.pop_mean.shape), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.pop_var, want[k][1].view(bn.pop_var.shape), rtol=1e-12, atol=1e-12)
        assert int(bn.pop_batches) == len(sizes)
    for k, v in net.state_dict().items():  # the network is frozen: parameters and moving averages untouched
        if k in params:
            assert torch.equal(v, params[k]), k
    assert net.training and net.bn1.collecting is None  # the mode it was in, nothing left collecting


def test_inference_uses_the_chosen_statistics():
    torch.manual_seed(1)
    net = _TwoBN().double()
    x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    net.train()
    net(x)  # one training step's moving averages
    net.eval()
    with pytest.raises(RuntimeError, match="population"):
        use_statistics(net, "population")
    moving = net(x)
    estimate_population(net, lambda: net(torch.randn(8, 3, 5, 5, dtype=torch.float64)))
    use_statistics(net, "population")
    scale, shift = net.bn2.affine()
    torch.testing.assert_close(scale, net.bn2.gamma / torch.sqrt(net.bn2.pop_var + EPS))
    torch.testing.assert_close(shift, net.bn2.beta - net.bn2.pop_mean * scale)
    assert not torch.allclose(net(x), moving)
    use_statistics(net, "moving")
    torch.testing.assert_close(net(x), moving)


def test_population_is_summed_over_replicas():
    """Under DDP each replica passes its share of the batches and ``reduce`` sums the totals: two replicas
    with the halves of the batches end with the statistics of all of them."""
    torch.manual_seed(2)
    net = _TwoBN().double()
    batches = [torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(4)]
    halves = [batches[0::2], batches[1::2]]
    totals = []
    for half in halves:  # each "replica" alone, keeping what it would all-reduce
        estimate_population(net, lambda half=half: [net(x) for x in half], lambda t: totals.append(t.clone()) or t)
    summed = totals[0] + totals[1]
    estimate_population(net, lambda: [net(x) for x in halves[0]], lambda t: summed)
    want = _independent_population(net, batches)
    torch.testing.assert_close(net.bn2.pop_var, want[2][1].view(net.bn2.pop_var.shape), rtol=1e-12, atol=1e-12)
    assert int(net.bn2.pop_batches) == 4
