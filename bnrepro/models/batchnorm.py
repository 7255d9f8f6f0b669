"""Batch Normalization as the paper defines it (Alg. 1 and 2), owned by this project.

Training normalizes with the mini-batch's own mean and *biased* variance (Alg. 1) and back-propagates
through those statistics with the gradients of Sec. 3.1. Inference uses population statistics (Alg. 2):
E[x] = E_B[mu_B] and Var[x] = m/(m-1) * E_B[sigma_B^2], averaged over N training mini-batches of the
trained, frozen network (``estimate_population``). Moving averages of the batch statistics are also kept,
as Alg. 2 allows, to track accuracy during training; ``statistics`` says which of the two inference uses.
With frozen statistics BN is an affine map, which ``fold_linear`` merges into the preceding linear layer
(Alg. 2, step 11).

One module serves every layout: the statistics are taken over ``reduce_dims`` and ``gamma``/``beta``
have size 1 there, so (batch, features) uses ``(0,)``, convolutions (N, C, H, W) use ``(0, 2, 3)``
(one gamma/beta per feature map, statistics over batch and space), and a stack of independent models
(models, batch, features) uses ``(1,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from bnrepro.recipes import Statistics


def bn_forward(x: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...], eps: float):
    """Alg. 1: normalize over ``dims`` with the batch mean and biased variance, then scale and shift.

    Returns ``y`` and what the backward pass and the moving averages need:
    ``(y, mean, var, x_hat, inv_std)``. (Sums rather than ``torch.var_mean``, which is several times
    slower on CPU for these shapes; the variance is still taken about the mean, not as E[x^2]-E[x]^2.)
    """
    m = x.numel() // gamma.numel()
    mean = x.sum(dims, keepdim=True).div_(m)
    centered = x - mean
    var = centered.square().sum(dims, keepdim=True).div_(m)
    inv_std = (var + eps).rsqrt_()
    x_hat = centered.mul_(inv_std)
    return torch.addcmul(beta, gamma, x_hat), mean, var, x_hat, inv_std


def bn_backward(grad_y: Tensor, x_hat: Tensor, gamma: Tensor, inv_std: Tensor, dims: tuple[int, ...]):
    """The gradients of Sec. 3.1, in closed form: returns ``(grad_x, grad_gamma, grad_beta)``.

    dl/dx = gamma/sigma * (dl/dy - mean(dl/dy) - x_hat * mean(dl/dy * x_hat)), which is the paper's
    chain through dl/dsigma^2 and dl/dmu collected into one expression.
    """
    m = grad_y.numel() // gamma.numel()
    grad_beta = grad_y.sum(dims, keepdim=True)
    grad_gamma = (grad_y * x_hat).sum(dims, keepdim=True)
    correction = torch.addcmul(grad_beta, x_hat, grad_gamma).div_(m)
    return (grad_y - correction).mul_(gamma * inv_std), grad_gamma, grad_beta


class _BatchNormTrain(torch.autograd.Function):
    """Autograd wrapper so any network can use ``bn_forward``/``bn_backward`` as one node."""

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...], eps: float):
        y, mean, var, x_hat, inv_std = bn_forward(x, gamma, beta, dims, eps)
        ctx.save_for_backward(x_hat, gamma, inv_std)
        ctx.dims = dims
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x_hat, gamma, inv_std = ctx.saved_tensors
        return *bn_backward(grad_y, x_hat, gamma, inv_std, ctx.dims), None, None


class _SyncBatchNormTrain(torch.autograd.Function):
    """Alg. 1 over the union of every replica's mini-batch (the ``sync`` option under DDP).

    Forward all-reduces the sums behind the mean and the biased variance; backward all-reduces the two sums
    the closed-form gradient needs, so each replica gets d(sum of all replicas' losses)/dx for its own x.
    gamma and beta get this replica's share, which DDP then averages like every other parameter gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...], eps: float):
        count = torch.tensor([x.numel() // gamma.numel()], dtype=x.dtype, device=x.device)
        total = torch.cat([x.sum(dims).reshape(-1), count])
        dist.all_reduce(total)
        m = total[-1]
        mean = (total[:-1] / m).reshape(gamma.shape)
        centered = x - mean
        var = centered.square().sum(dims, keepdim=True)
        dist.all_reduce(var)
        var = var / m
        inv_std = (var + eps).rsqrt()
        x_hat = centered.mul_(inv_std)
        ctx.save_for_backward(x_hat, gamma, inv_std, m)
        ctx.dims = dims
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(beta, gamma, x_hat), mean, var

    @staticmethod
    def backward(ctx, grad_y: Tensor, _grad_mean: Tensor, _grad_var: Tensor):
        x_hat, gamma, inv_std, m = ctx.saved_tensors
        grad_beta = grad_y.sum(ctx.dims, keepdim=True)
        grad_gamma = (grad_y * x_hat).sum(ctx.dims, keepdim=True)
        sums = torch.cat([grad_beta.reshape(-1), grad_gamma.reshape(-1)])
        dist.all_reduce(sums)
        all_beta, all_gamma = (part.reshape(gamma.shape) for part in sums.chunk(2))
        correction = torch.addcmul(all_beta, x_hat, all_gamma).div_(m)
        return (grad_y - correction).mul_(gamma * inv_std), grad_gamma, grad_beta, None, None


def batch_norm_train(x: Tensor, gamma: Tensor, beta: Tensor, dims: tuple[int, ...], eps: float, sync: bool = False):
    """Normalize ``x`` over ``dims`` with batch statistics; returns (y, batch mean, biased batch variance).

    ``sync``: the statistics are those of all DDP replicas' mini-batches together (needs a process group).
    """
    if sync:
        return _SyncBatchNormTrain.apply(x, gamma, beta, dims, eps)
    return _BatchNormTrain.apply(x, gamma, beta, dims, eps)


class PopulationSums:
    """Alg. 2's averages over mini-batches, summed in float64: E[x] = mean of mu_B, Var[x] = mean of
    m/(m-1) * sigma2_B. With one batch size m this is exactly Alg. 2; a batch of another size (the last of a
    split, or one that lost unreadable images) enters with its own m. A batch of one value has no variance
    and is left out."""

    def __init__(self) -> None:
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.batches = 0

    def add(self, mean: Tensor, var: Tensor, m: int) -> None:
        if m < 2:
            return
        mean, var = mean.detach().double(), var.detach().double() * (m / (m - 1))
        if self.mean is None:
            self.mean, self.var = mean.clone(), var.clone()
        else:
            self.mean += mean
            self.var += var
        self.batches += 1

    def add_batches(self, means: Tensor, variances: Tensor, m: int) -> None:
        """``add`` for several batches of size ``m`` at once: their statistics stacked along dim 0."""
        if m < 2:
            return
        mean, var = means.detach().double().sum(0), variances.detach().double().mul(m / (m - 1)).sum(0)
        if self.mean is None:
            self.mean, self.var = mean, var
        else:
            self.mean += mean
            self.var += var
        self.batches += len(means)


class BatchNorm(nn.Module):
    """BN over ``reduce_dims`` of an input whose other dims match ``shape`` (which has 1 at ``reduce_dims``)."""

    def __init__(self, shape: tuple[int, ...], reduce_dims: tuple[int, ...], eps: float, momentum: float):
        super().__init__()
        if any(shape[d] != 1 for d in reduce_dims):
            raise ValueError(f"shape {shape} must have size 1 at the reduced dims {reduce_dims}")
        self.reduce_dims, self.eps, self.momentum = tuple(reduce_dims), eps, momentum
        self.sync = False  # statistics over all DDP replicas' mini-batches (off: per replica, as the paper)
        self.statistics: Statistics = "moving"  # which statistics inference uses (set by ``use_statistics``)
        self.collecting: PopulationSums | None = None  # set while ``estimate_population`` runs
        # (batch, C) and (batch, C, H, W) train on torch's fused kernel (cuDNN on a GPU); other layouts, synced
        # statistics and Alg. 2's estimate on the closed form below, which the tests hold the fused kernel to
        self.fused = reduce_dims in ((0,), (0, 2, 3)) and len(shape) == len(reduce_dims) + 1
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        # moving averages of mu_B and of the unbiased m/(m-1) sigma2_B (torch's convention), for tracking accuracy
        self.register_buffer("mean_avg", torch.zeros(shape))
        self.register_buffer("var_avg", torch.ones(shape))
        # Alg. 2's population statistics E[x], Var[x] (unbiased), and how many mini-batches they average (0: none)
        self.register_buffer("pop_mean", torch.zeros(shape))
        self.register_buffer("pop_var", torch.ones(shape))
        self.register_buffer("pop_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.fused and self.collecting is None and not self.synced:
            # Alg. 1 in one fused kernel; it accumulates bf16 inputs' statistics in float32 and updates the
            # moving averages in place (through views of the buffers)
            return F.batch_norm(x, self.mean_avg.view(-1), self.var_avg.view(-1), self.gamma.view(-1),
                                self.beta.view(-1), True, self.momentum, self.eps)
        # statistics in float32 whatever the input (bf16 autocast would lose the variance), output as input
        dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))
        if not self.training:
            scale, shift = self.affine()
            return torch.addcmul(shift, x, scale).to(dtype)
        if self.collecting is not None:  # Alg. 2: the frozen network's batch statistics, for the population
            y, mean, var, _, _ = bn_forward(x, self.gamma, self.beta, self.reduce_dims, self.eps)
            self.collecting.add(mean, var, x.numel() // mean.numel())
            return y.to(dtype)
        y, mean, var = batch_norm_train(x, self.gamma, self.beta, self.reduce_dims, self.eps, self.synced)
        self.track(mean, var, x.numel() // mean.numel() * (dist.get_world_size() if self.synced else 1))
        return y.to(dtype)

    @torch.no_grad()
    def track(self, mean: Tensor, var: Tensor, m: int) -> None:
        """Fold one mini-batch's mean and biased variance over ``m`` values into the moving averages, as the
        fused kernel does (Alg. 2 allows these for tracking)."""
        self.mean_avg.lerp_(mean, self.momentum)
        self.var_avg.lerp_(var * (m / max(m - 1, 1)), self.momentum)

    @property
    def synced(self) -> bool:
        return self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def affine(self, statistics: Statistics | None = None) -> tuple[Tensor, Tensor]:
        """The inference transform y = scale * x + shift (Alg. 2, step 11), with ``statistics`` (default:
        ``self.statistics``): Alg. 2's population statistics, or the moving averages."""
        if (statistics or self.statistics) == "population":
            if int(self.pop_batches) == 0:
                raise RuntimeError("BN has no population statistics yet (estimate_population computes them)")
            mean, var = self.pop_mean, self.pop_var
        else:
            mean, var = self.mean_avg, self.var_avg
        return inference_affine(self.gamma, self.beta, mean, var, self.eps)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.gamma.shape)}, reduce_dims={self.reduce_dims}, eps={self.eps}"


@torch.no_grad()
def estimate_population(model: nn.Module, forward_batches: Callable[[], None],
                        reduce: Callable[[Tensor], Tensor] = lambda sums: sums) -> int:
    """Alg. 2, steps 8-10: population statistics of every BN of ``model`` from the mini-batches that
    ``forward_batches()`` passes through it; returns how many batches they average.

    The trained network is frozen: no parameter or moving average changes, dropout is off, and each BN
    normalizes with its batch's own statistics (the training network N_BN^tr of Alg. 2), so every layer sees
    the inputs it saw in training. ``reduce`` sums the totals over DDP replicas (each replica passes its
    share of the batches), so every replica ends with the same statistics.
    """
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    training = model.training
    model.eval()
    for bn in layers:
        bn.train()
        bn.collecting = PopulationSums()
    try:
        forward_batches()
        sums = [bn.collecting for bn in layers]
    finally:
        model.train(training)
        for bn in layers:
            bn.collecting = None
    parts = []
    for bn, found in zip(layers, sums):
        zero = torch.zeros(bn.gamma.shape, dtype=torch.float64, device=bn.gamma.device)
        parts += [zero if found.mean is None else found.mean, zero if found.var is None else found.var,
                  torch.tensor([float(found.batches)], dtype=torch.float64, device=bn.gamma.device)]
    if not parts:
        return 0
    sizes = [p.numel() for p in parts]
    totals = reduce(torch.cat([p.reshape(-1) for p in parts])).split(sizes)
    batches = []
    for i, bn in enumerate(layers):
        mean, var, count = totals[3 * i : 3 * i + 3]
        n = int(count.item())
        batches.append(n)
        if n:
            bn.pop_mean.copy_((mean / n).view(bn.pop_mean.shape))
            bn.pop_var.copy_((var / n).view(bn.pop_var.shape))
        bn.pop_batches.fill_(n)
    return min(batches)


def use_statistics(model: nn.Module, statistics: Statistics) -> None:
    """Make every BN of ``model`` infer with ``statistics``; population statistics must have been estimated."""
    for bn in (m for m in model.modules() if isinstance(m, BatchNorm)):
        if statistics == "population" and int(bn.pop_batches) == 0:
            raise RuntimeError("BN has no population statistics yet (estimate_population computes them)")
        bn.statistics = statistics


def population(mean_avg: Tensor, var_avg: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """E[x] and the unbiased Var[x] = m/(m-1) E_B[sigma_B^2] of Alg. 2, from averaged batch statistics."""
    m = max(m, 2)
    return mean_avg, var_avg * (m / (m - 1))


def inference_affine(gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """BN with frozen population statistics E[x], Var[x] (unbiased) as y = scale * x + shift (Alg. 2, step 11)."""
    scale = gamma * torch.rsqrt(var.to(gamma.dtype) + eps)
    return scale, beta - mean.to(gamma.dtype) * scale


@torch.no_grad()
def fold_linear(weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Merge an inference-mode BN (``scale * z + shift``) into the linear map before it: W' = W*scale, b' = ...

    ``scale`` must broadcast against the weight's output-feature axis (the caller reshapes it to its
    layout, e.g. ``(C, 1, 1, 1)`` for a conv weight); the new bias comes back in ``shift``'s shape.
    """
    if bias is not None:  # BN(Wu + b) = scale*Wu + (scale*b + shift), one value per output feature
        shift = shift + scale.reshape(shift.shape) * bias.reshape(shift.shape)
    return weight * scale, shift
