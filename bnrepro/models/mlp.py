"""The MNIST network of Sec. 4.1 as a *stack*: many independent copies trained as one computation.

Each seed of a variant is one member of the stack. Members share no parameters, but every layer of all
members is one batched product, so ten seeds cost far less than ten runs. The whole stack lives in one
flat parameter (one optimizer update per step), and its forward and backward passes are written out in
closed form (``_StackLoss``): the network is tiny, so a step is bound by per-operation overhead, and the
hand-written pass needs about half the operations autograd would. It computes exactly the same
gradients; the tests check it against autograd and against ``torch.nn.functional.batch_norm``.

Layout: activations are (batch, members * width), contiguous, so BN statistics are plain column sums;
hidden weights are (members, in, out) for ``torch.bmm``; the first weight is (in, members * width), a
table whose rows a binary input sums (``embedding_bag``), exactly and ~7x cheaper than the dense product.

This is the torch engine. On a CPU the native engine (``mlp_native.NativeStack``) trains the same
parameters, in place, with a C++ kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrepro.models.batchnorm import (
    PopulationSums,
    Statistics,
    bn_backward,
    bn_forward,
    fold_linear,
    inference_affine,
    population,
)
from bnrepro.models.binary import BinaryBatch


@dataclass
class StackParams:
    """Views into one flat tensor (the parameters, or a gradient buffer of the same size), per layer."""

    weights: list[Tensor]  # weights[0]: (in, members * width); the others (members, in, out)
    gamma: list[Tensor]  # per hidden layer, (1, BN members * width)
    beta: list[Tensor]
    bias: list[Tensor]  # per hidden layer, (1, plain members * width)
    bias_out: Tensor  # (1, members * classes)

POPULATION_VALUES = 4_000_000  # activations (rows x members x width) per pass of Alg. 2's estimate: ~16 MB
_ACTIVATIONS = {
    "sigmoid": (torch.sigmoid, torch.ops.aten.sigmoid_backward),  # backward(grad, output)
    "relu": (torch.relu, lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0)),
}


class MLPStack(nn.Module):
    """``len(seeds)`` MLPs with layer widths ``widths``; member i is initialised from ``seeds[i]`` alone.

    Members with ``batch_norm[i]`` compute g(BN(Wu)) in every hidden layer, with no bias (BN's beta
    replaces it, Sec. 3.2); the others compute g(Wu + b). BN members come first, so each layer's BN acts
    on one contiguous block of columns. The output layer is a plain affine map into the softmax.
    ``init_std`` and ``lr_scale`` may differ per member (``bnrepro sweep``): member i's initial weights have
    std ``init_std[i]`` and its SGD steps are ``lr_scale[i]`` x the optimizer's learning rate.
    """

    def __init__(
        self,
        seeds: list[int],
        widths: list[int],
        *,
        batch_norm: list[bool],
        nonlinearity: str,
        init: str,
        init_std: float | list[float],
        bn_eps: float,
        bn_momentum: float,
        lr_scale: list[float] | None = None,
    ):
        super().__init__()
        if len(batch_norm) != len(seeds) or list(batch_norm) != sorted(batch_norm, reverse=True):
            raise ValueError("batch_norm needs one flag per seed, BN members first")
        stds = [init_std] * len(seeds) if isinstance(init_std, int | float) else list(init_std)
        self.lr_scale = [1.0] * len(seeds) if lr_scale is None else [float(x) for x in lr_scale]
        if len(stds) != len(seeds) or len(self.lr_scale) != len(seeds):
            raise ValueError("init_std and lr_scale need one value per member")
        self.members, self.widths, self.normalized = len(seeds), list(widths), sum(batch_norm)
        self.bn_eps, self.bn_momentum, self.nonlinearity = bn_eps, bn_momentum, nonlinearity
        self.activation, self.activation_backward = _ACTIVATIONS[nonlinearity]
        self.shapes = self._layout()
        self.flat = nn.Parameter(torch.zeros(sum(math.prod(s) for s in self.shapes.values())))
        self._initialise(seeds, init, stds)
        if any(scale != 1.0 for scale in self.lr_scale):  # the torch engine: each member's gradient x its scale
            self.register_buffer("lr_multiplier", self.member_values(self.lr_scale), persistent=False)
            self.flat.register_hook(self._scale_gradient)
        self._avg_names = [(f"mean_avg{layer}", f"var_avg{layer}") for layer in range(len(self.hidden))]
        for (mean_name, var_name), width in zip(self._avg_names, self.hidden):
            self.register_buffer(mean_name, torch.zeros(1, self.normalized * width))
            self.register_buffer(var_name, torch.ones(1, self.normalized * width))
        self.register_buffer("bn_batch", torch.zeros((), dtype=torch.long))  # m, for Var's m/(m-1)
        for layer, width in enumerate(self.hidden):  # Alg. 2's population statistics (see estimate_population)
            self.register_buffer(f"pop_mean{layer}", torch.zeros(1, self.normalized * width))
            self.register_buffer(f"pop_var{layer}", torch.ones(1, self.normalized * width))
        self.register_buffer("pop_batches", torch.zeros((), dtype=torch.long))  # 0: not estimated yet
        self.statistics: Statistics = "moving"  # which statistics inference uses

    @property
    def hidden(self) -> list[int]:
        return self.widths[1:-1]

    def _layout(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter, in their order within ``flat``."""
        members, widths, layers = self.members, self.widths, range(len(self.widths) - 2)
        shapes = {"weight0": (widths[0], members * widths[1])}
        shapes.update({f"weight{i + 1}": (members, widths[i + 1], widths[i + 2]) for i in layers})
        shapes.update({f"gamma{i}": (1, self.normalized * widths[i + 1]) for i in layers})
        shapes.update({f"beta{i}": (1, self.normalized * widths[i + 1]) for i in layers})
        shapes.update({f"bias{i}": (1, (members - self.normalized) * widths[i + 1]) for i in layers})
        shapes["bias_out"] = (1, members * widths[-1])
        return shapes

    def unflatten(self, flat: Tensor) -> StackParams:
        """Per-layer views of ``flat`` (the parameters, or a gradient buffer of the same size)."""
        parts = [part.view(shape) for part, shape in
                 zip(flat.split([math.prod(s) for s in self.shapes.values()]), self.shapes.values())]
        n = len(self.hidden)
        return StackParams(parts[: n + 1], parts[n + 1 : 2 * n + 1], parts[2 * n + 1 : 3 * n + 1],
                           parts[3 * n + 1 : 4 * n + 1], parts[-1])

    def averages(self, layer: int) -> tuple[Tensor, Tensor]:
        """The moving averages E_B[mu_B], E_B[sigma_B^2] of a hidden layer's BN members."""
        mean_name, var_name = self._avg_names[layer]
        return self._buffers[mean_name], self._buffers[var_name]

    def _scale_gradient(self, grad: Tensor) -> Tensor:
        return grad * self.lr_multiplier

    @torch.no_grad()
    def member_values(self, values: list[float]) -> Tensor:
        """A tensor shaped like ``flat`` holding ``values[i]`` at every parameter of member i."""
        out = torch.zeros_like(self.flat)
        params, members, bn = self.unflatten(out), self.members, self.normalized
        for m, value in enumerate(values):
            params.weights[0].view(self.widths[0], members, -1)[:, m] = value
            for weight in params.weights[1:]:
                weight[m] = value
            if m < bn:
                for t in (*params.gamma, *params.beta):
                    t.view(bn, -1)[m] = value
            else:
                for t in params.bias:
                    t.view(members - bn, -1)[m - bn] = value
            params.bias_out.view(members, -1)[m] = value
        return out

    @torch.no_grad()
    def _initialise(self, seeds: list[int], init: str, stds: list[float]) -> None:
        params = self.unflatten(self.flat)
        for member, (seed, std) in enumerate(zip(seeds, stds)):
            generator = torch.Generator().manual_seed(seed)
            for layer, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:])):
                w = torch.empty(fan_in, fan_out)
                if init == "truncated_normal":
                    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)
                else:
                    nn.init.normal_(w, std=std, generator=generator)
                if layer == 0:
                    params.weights[0][:, member * fan_out : (member + 1) * fan_out] = w
                else:
                    params.weights[layer][member] = w
        for gamma in params.gamma:
            gamma.fill_(1.0)

    def losses(self, x: BinaryBatch, targets: Tensor) -> Tensor:
        """Mean cross-entropy of each member on the batch, (members,); back-propagates into ``flat``.

        Training mode: BN uses batch statistics and updates its moving averages.
        """
        return _StackLoss.apply(self.flat, self, x, targets)

    @torch.no_grad()
    def predict(self, x: BinaryBatch) -> tuple[Tensor, Tensor]:
        """Inference (Alg. 2): logits (batch, members, classes) and the inputs of the last hidden layer's
        nonlinearities (batch, members, width), the quantity Fig. 1(b, c) follows."""
        logits, _, pre = self.forward_pass(self.unflatten(self.flat), x, train=False)
        return logits, pre.view(x.shape[0], self.members, -1)

    def forward_pass(self, params: StackParams, x: BinaryBatch, train: bool):
        """Logits (batch, members, classes), per-layer caches for the backward pass, last pre-activation."""
        batch, members = x.shape[0], self.members
        z = x.matmul(params.weights[0])  # x @ W0 for every member at once
        caches = []
        for layer, width in enumerate(self.hidden):
            split, cache = self.normalized * width, None  # columns [0, split) belong to BN members
            parts = [z[:, split:] + params.bias[layer]] if split < z.shape[1] else []
            if split and train:
                y, mean, var, x_hat, inv_std = bn_forward(z[:, :split], params.gamma[layer], params.beta[layer], (0,),
                                                          self.bn_eps)
                self._track(layer, mean, var, batch)
                parts, cache = [y, *parts], (x_hat, inv_std)
            elif split:
                scale, shift = self.bn_affine(params, layer)
                parts = [torch.addcmul(shift, z[:, :split], scale), *parts]
            pre = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            h = self.activation(pre)
            caches.append((h, cache))
            z = _batched_matmul(h, params.weights[layer + 1], members)
        logits = (z + params.bias_out).view(batch, members, -1)
        return logits, caches, pre

    @torch.no_grad()
    def estimate_population(self, batches: list[BinaryBatch]) -> None:
        """Alg. 2, steps 8-10: E[x] = mean of mu_B and Var[x] = mean of m/(m-1) sigma2_B of every BN over
        ``batches``, each passed through the trained network frozen (batch statistics, nothing updated).

        Consecutive batches of one size go through together, each normalized with its own statistics: a
        mini-batch of 60 is too small to pay for ~30 tensor operations, and every evaluation runs this pass."""
        params = self.unflatten(self.flat)
        sums = [PopulationSums() for _ in self.hidden]
        rows = max(1, POPULATION_VALUES // (self.members * max(self.hidden)))  # rows per pass: bounded memory
        start = 0
        while start < len(batches):
            m = batches[start].shape[0]
            stop = start + 1
            while stop < len(batches) and batches[stop].shape[0] == m and (stop - start + 1) * m <= rows:
                stop += 1
            self._population_pass(params, batches[start:stop], sums)
            start = stop
        if self.normalized and sums[0].batches == 0:
            raise ValueError("population statistics need at least one mini-batch of two or more examples")
        for layer, found in enumerate(sums):
            if found.mean is not None:
                self._buffers[f"pop_mean{layer}"].copy_(found.mean / found.batches)
                self._buffers[f"pop_var{layer}"].copy_(found.var / found.batches)
        self.pop_batches.fill_(sums[0].batches)

    def _population_pass(self, params: StackParams, batches: list[BinaryBatch], sums: list[PopulationSums]) -> None:
        """The training-mode forward pass of ``batches`` (all of one size m) as one computation: each batch's BN
        inputs normalized with that batch's mean and biased variance (Alg. 1), which are added to ``sums``."""
        k, m, members = len(batches), batches[0].shape[0], self.members
        x = BinaryBatch(torch.cat([batch.bits for batch in batches])) if k > 1 else batches[0]
        z = x.matmul(params.weights[0])
        for layer, width in enumerate(self.hidden):
            split = self.normalized * width  # columns [0, split) belong to BN members
            parts = [z[:, split:] + params.bias[layer]] if split < z.shape[1] else []
            if split:
                by_batch = z[:, :split].reshape(k, m, split)  # as bn_forward computes it, per batch
                mean = by_batch.sum(1, keepdim=True).div_(m)
                centered = by_batch - mean
                var = centered.square().sum(1, keepdim=True).div_(m)
                y = torch.addcmul(params.beta[layer], params.gamma[layer], centered.mul_((var + self.bn_eps).rsqrt_()))
                sums[layer].add_batches(mean.squeeze(1), var.squeeze(1), m)
                parts = [y.view(k * m, split), *parts]
            h = self.activation(torch.cat(parts, 1) if len(parts) > 1 else parts[0])
            z = _batched_matmul(h, params.weights[layer + 1], members)

    @torch.no_grad()
    def _track(self, layer: int, mean: Tensor, var: Tensor, batch: int) -> None:
        mean_avg, var_avg = self.averages(layer)
        mean_avg.lerp_(mean, self.bn_momentum)
        var_avg.lerp_(var, self.bn_momentum)
        if layer == 0:
            self.bn_batch.fill_(batch)

    def bn_affine(self, params: StackParams, layer: int, statistics: Statistics | None = None) -> tuple[Tensor, Tensor]:
        """BN of a hidden layer's BN members at inference, with ``statistics`` (default ``self.statistics``)."""
        if (statistics or self.statistics) == "population":
            if int(self.pop_batches) == 0:
                raise RuntimeError("the stack has no population statistics yet (estimate_population computes them)")
            mean, var = self._buffers[f"pop_mean{layer}"], self._buffers[f"pop_var{layer}"]
        else:
            mean, var = population(*self.averages(layer), int(self.bn_batch))
        return inference_affine(params.gamma[layer], params.beta[layer], mean, var, self.bn_eps)

    def backward_pass(self, params: StackParams, grads: StackParams, x: BinaryBatch, caches,
                      grad_logits: Tensor) -> None:
        """Write d(loss)/d(parameter) into ``grads`` (views of one flat buffer), last layer first."""
        members = self.members
        grad_z = grad_logits.view(x.shape[0], -1)
        torch.sum(grad_z, 0, keepdim=True, out=grads.bias_out)
        for layer in reversed(range(len(self.hidden))):
            h, cache = caches[layer]
            weight = params.weights[layer + 1]
            torch.bmm(_by_member(h, members).transpose(1, 2), _by_member(grad_z, members),
                      out=grads.weights[layer + 1])
            grad_pre = self.activation_backward(_batched_matmul(grad_z, weight.transpose(1, 2), members), h)
            split = self.normalized * self.hidden[layer]
            parts = []
            if split:
                x_hat, inv_std = cache
                grad_bn, grad_gamma, grad_beta = bn_backward(grad_pre[:, :split], x_hat, params.gamma[layer], inv_std,
                                                             (0,))
                grads.gamma[layer].copy_(grad_gamma)
                grads.beta[layer].copy_(grad_beta)
                parts.append(grad_bn)
            if split < grad_pre.shape[1]:
                torch.sum(grad_pre[:, split:], 0, keepdim=True, out=grads.bias[layer])
                parts.append(grad_pre[:, split:])
            grad_z = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        grads.weights[0].copy_(x.t_matmul(grad_z))

    @torch.no_grad()
    def folded(self) -> list[tuple[Tensor, Tensor]]:
        """The inference network with every BN merged into its layer, with Alg. 2's population statistics:
        [(W (members, in, out), b (members, 1, out))] per layer, for a plain ``act(h @ W + b)`` evaluation."""
        params, members = self.unflatten(self.flat), self.members
        weights = [params.weights[0].view(self.widths[0], members, -1).transpose(0, 1), *params.weights[1:]]
        layers = []
        for layer, weight in enumerate(weights[:-1]):
            scale, shift = self.bn_affine(params, layer, "population") if self.normalized else (
                params.gamma[layer], params.beta[layer])
            plain = torch.ones_like(params.bias[layer])
            scale, shift = torch.cat([scale, plain], 1), torch.cat([shift, params.bias[layer]], 1)
            layers.append(fold_linear(weight, None, scale.view(members, 1, -1), shift.view(members, 1, -1)))
        return [*layers, (weights[-1], params.bias_out.view(members, 1, -1))]


def _by_member(a: Tensor, members: int) -> Tensor:
    """(batch, members * width) -> (members, batch, width) view, for ``torch.bmm``."""
    return a.view(a.shape[0], members, -1).transpose(0, 1)


def _batched_matmul(a: Tensor, weight: Tensor, members: int) -> Tensor:
    """Each member's (batch, in) slice of ``a`` times its (in, out) weight, as (batch, members * out)."""
    out = a.new_empty(a.shape[0], members, weight.shape[-1])
    torch.bmm(_by_member(a, members), weight, out=out.transpose(0, 1))
    return out.view(a.shape[0], -1)


class _StackLoss(torch.autograd.Function):
    """Per-member mean cross-entropy of an ``MLPStack``, with the closed-form backward pass."""

    @staticmethod
    def forward(ctx, flat: Tensor, stack: MLPStack, x: BinaryBatch, targets: Tensor) -> Tensor:
        params = stack.unflatten(flat)
        logits, caches, _ = stack.forward_pass(params, x, train=True)
        log_probs = torch.log_softmax(logits, dim=2)
        picked = log_probs.gather(2, targets.view(-1, 1, 1).expand(-1, stack.members, 1))
        ctx.stack, ctx.x, ctx.params, ctx.caches, ctx.numel = stack, x, params, caches, flat.numel()
        ctx.save_for_backward(log_probs, targets)
        return picked.mean(0).view(-1).neg()

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        log_probs, targets = ctx.saved_tensors
        # d(mean CE)/d(logits) = (softmax - onehot) / batch, per member scaled by its incoming gradient
        grad_logits = log_probs.exp().sub_(F.one_hot(targets, log_probs.shape[2]).unsqueeze(1))
        grad_logits.mul_(grad_losses.view(1, -1, 1) / len(targets))
        grad_flat = log_probs.new_empty(ctx.numel)  # every element is written below
        ctx.stack.backward_pass(ctx.params, ctx.stack.unflatten(grad_flat), ctx.x, ctx.caches, grad_logits)
        return grad_flat, None, None, None
