"""The native engine of an ``MLPStack``: whole chunks of SGD steps, and inference, in one C++ call.

The parameters stay in the stack's flat tensor (so checkpoints, ``folded()`` and the torch engine all see
the same thing); the kernel (bnrepro/native/mlp.cpp) gets one pointer per member and tensor and updates
them in place. It implements what the MNIST recipes train with: sigmoid or ReLU, BN or bias, softmax
cross-entropy, plain SGD (no momentum, no weight decay), on a CPU; and the evaluations, Alg. 2's population pass
included. On x86 each kernel call flushes subnormal floats to zero in its threads (saturated sigmoids made millions,
each a microcode assist: ``FlushDenormals`` in mlp.cpp) and leaves the caller's floating-point mode as it was.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from bnrepro import native
from bnrepro.models.mlp import MLPStack

_ACTIVATIONS = {"sigmoid": 0, "relu": 1}  # the kernel's codes


@dataclass
class BinaryRows:
    """Binary examples as the kernel reads them: the active features of example i are
    ``features[offsets[i]:offsets[i + 1]]`` (compressed sparse rows)."""

    offsets: Tensor  # int64, (examples + 1,)
    features: Tensor  # int32
    width: int  # features per example

    @classmethod
    def of(cls, bits: Tensor) -> BinaryRows:
        active = bits.bool().cpu().nonzero()  # (example, feature) pairs, in example order
        offsets = torch.zeros(len(bits) + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(active[:, 0], minlength=len(bits)), 0, out=offsets[1:])
        return cls(offsets, active[:, 1].to(torch.int32).contiguous(), bits.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1


def unsupported(stack: MLPStack, device: torch.device, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the native engine cannot train this stack here, or None if it can."""
    if device.type != "cpu":
        return f"it runs on the CPU, not {device.type}"
    if stack.nonlinearity not in _ACTIVATIONS:
        return "it knows only sigmoid and ReLU"
    if not stack.hidden:
        return "it needs at least one hidden layer"
    if min(stack.widths[1:]) < 8:
        return "it needs every layer (and the classes) at least 8 wide"
    sgd = isinstance(optimizer, torch.optim.SGD) and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    if not sgd or group["momentum"] or group["weight_decay"] or group["nesterov"] or group["maximize"]:
        return "it implements plain SGD only (no momentum, no weight decay)"
    try:
        native.library("mlp")
    except native.Unavailable as error:
        return str(error)
    return None


_I, _F, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {  # see bnrepro/native/mlp.cpp
    "bnrepro_mlp_train": [_I, _P, _I, _I, _F, _F, _I, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _I],
    "bnrepro_mlp_predict": [_I, _P, _I, _I, _I, _P, _I, _P, _P, _I, _P, _P, _I],
    "bnrepro_mlp_population": [_I, _P, _I, _I, _F, _I, _P, _I, _I, _P, _P, _P, _P, _P, _I],
}


def _kernel(name: str):
    function = getattr(native.library("mlp"), name)
    function.argtypes, function.restype = _SIGNATURES[name], ctypes.c_int
    return function


def _raise_for(status: int) -> None:
    if status == 1:
        raise RuntimeError("the native MLP kernel refused this network's shape")
    if status != 0:
        raise RuntimeError("the native MLP kernel ran out of memory or threads")


def _slot(t: Tensor, index: int, width: int) -> Tensor:
    """Member ``index``'s part of a (1, members * width) row."""
    return t[0, index * width : (index + 1) * width]


class NativeStack:
    """Trains and evaluates ``stack`` with the native kernel, Alg. 2's population statistics included;
    ``unsupported()`` must have said None."""

    def __init__(self, stack: MLPStack, threads: int | None = None):
        """``threads``: the kernel's threads (each trains whole members); default: torch's thread count."""
        self.stack, self.threads = stack, threads or torch.get_num_threads()
        self._train, self._predict = _kernel("bnrepro_mlp_train"), _kernel("bnrepro_mlp_predict")
        self._population = _kernel("bnrepro_mlp_population")
        self.widths = torch.tensor(stack.widths, dtype=torch.int64)
        self.bn = torch.tensor([m < stack.normalized for m in range(stack.members)], dtype=torch.uint8)
        # Training reads and writes the parameters and BN averages where they are (updated in place, never
        # replaced), so its pointer table is made once; inference's points at affine maps made per call.
        self._train_table = self._table(self._training_entries)

    def _training_entries(self, params, m: int, layer: int) -> list[Tensor | None]:
        """Member ``m``'s (gamma, beta, mean average, variance average) of a hidden layer, or (bias, -, -, -)."""
        stack, width = self.stack, self.stack.hidden[layer]
        if m < stack.normalized:
            tensors = (params.gamma[layer], params.beta[layer], *stack.averages(layer))
            return [_slot(t, m, width) for t in tensors]
        return [_slot(params.bias[layer], m - stack.normalized, width), None, None, None]

    def _check(self, data: BinaryRows) -> None:
        """The kernel trusts its indices; a mismatch here would read out of bounds there."""
        if data.width != self.stack.widths[0]:
            raise ValueError(f"examples have {data.width} features, the network {self.stack.widths[0]} inputs")

    def _mini_batches(self, examples: Tensor, data: BinaryRows) -> Tensor:
        """``examples`` (batches, batch) as the kernels read them: contiguous int64 indices of rows of ``data``,
        checked, since the kernels trust them."""
        self._check(data)
        examples = examples.to(torch.int64).contiguous()
        if examples.dim() != 2:
            raise ValueError(f"examples must be (batches, batch) indices, not of shape {tuple(examples.shape)}")
        if examples.numel() and (examples.min() < 0 or examples.max() >= len(data)):
            raise ValueError(f"example indices must lie in [0, {len(data)})")
        return examples

    def _shape(self) -> list[int]:
        """The leading arguments of every kernel: layers, widths, first weight's row stride, nonlinearity."""
        first_row = self.stack.shapes["weight0"][1]  # the first weight is (inputs, members * width)
        return [len(self.stack.hidden), self.widths.data_ptr(), first_row, _ACTIVATIONS[self.stack.nonlinearity]]

    def _table(self, layer_entries) -> tuple[ctypes.Array, list[Tensor]]:
        """Per member: its weights, the four tensors ``layer_entries(params, member, layer)`` gives for each
        hidden layer (None for none), its output bias; as a C array of pointers, and the tensors (to keep)."""
        stack, params = self.stack, self.stack.unflatten(self.stack.flat.data)
        keep, pointers, w1 = [], [], stack.widths[1]
        for m in range(stack.members):
            row = [params.weights[0][:, m * w1 : (m + 1) * w1], *(w[m] for w in params.weights[1:])]
            for layer in range(len(stack.hidden)):
                row += layer_entries(params, m, layer)
            row.append(_slot(params.bias_out, m, stack.widths[-1]))
            keep += row
            pointers += [0 if t is None else t.data_ptr() for t in row]
        return (ctypes.c_void_p * len(pointers))(*pointers), keep

    def train_steps(self, examples: Tensor, data: BinaryRows, labels: Tensor, learning_rates: list[float]) -> Tensor:
        """SGD steps on the mini-batches ``examples`` (steps, batch) of ``data`` (labels: int64); returns the
        losses (steps, members). Updates the parameters and BN's moving averages in place."""
        stack = self.stack
        examples = self._mini_batches(examples, data)
        steps, batch = examples.shape
        if len(labels) != len(data) or labels.dtype != torch.int64 or not labels.is_contiguous():
            raise ValueError("labels must be one contiguous int64 label per example")
        if len(labels) and (labels.min() < 0 or labels.max() >= stack.widths[-1]):
            raise ValueError(f"labels must lie in [0, {stack.widths[-1]})")
        if len(learning_rates) != steps:
            raise ValueError(f"{steps} steps need {steps} learning rates, not {len(learning_rates)}")
        table, _ = self._train_table
        # each step's rate for each member: (steps, members), the member's scale x the step's rate
        lrs = torch.outer(torch.tensor(learning_rates, dtype=torch.float64),
                          torch.tensor(stack.lr_scale, dtype=torch.float64)).float().contiguous()
        losses = torch.empty(steps, stack.members)
        status = self._train(*self._shape(), stack.bn_eps, stack.bn_momentum, stack.members, table,
                             self.bn.data_ptr(), steps, batch, examples.data_ptr(), data.offsets.data_ptr(),
                             data.features.data_ptr(), labels.data_ptr(), lrs.data_ptr(), losses.data_ptr(),
                             self.threads)
        _raise_for(status)
        if stack.normalized:
            stack.bn_batch.fill_(batch)  # m, for the unbiased population variance (Alg. 2)
        return losses

    @torch.no_grad()
    def predict(self, data: BinaryRows, probe_unit: int) -> tuple[Tensor, Tensor]:
        """Inference (Alg. 2): logits (examples, members, classes) and the input of unit ``probe_unit`` of the
        last hidden layer's nonlinearity (examples, members)."""
        stack, params = self.stack, self.stack.unflatten(self.stack.flat.data)
        affine = []  # per hidden layer: BN with population statistics, or the bias, as scale and shift
        for layer in range(len(stack.hidden)):
            parts = [stack.bn_affine(params, layer)] if stack.normalized else []
            if stack.normalized < stack.members:
                parts.append((torch.ones_like(params.bias[layer]), params.bias[layer]))
            affine.append([torch.cat(ts, 1) for ts in zip(*parts)])

        def entries(params, m, layer):
            return [*(_slot(t, m, stack.hidden[layer]) for t in affine[layer]), None, None]

        self._check(data)
        if not 0 <= probe_unit < stack.hidden[-1]:
            raise ValueError(f"probe_unit must lie in [0, {stack.hidden[-1]})")
        table, _keep = self._table(entries)
        logits = torch.empty(len(data), stack.members, stack.widths[-1])
        probes = torch.empty(len(data), stack.members)
        status = self._predict(*self._shape(), stack.members, table, len(data), data.offsets.data_ptr(),
                               data.features.data_ptr(), probe_unit, logits.data_ptr(), probes.data_ptr(),
                               self.threads)
        _raise_for(status)
        return logits, probes

    @torch.no_grad()
    def estimate_population(self, examples: Tensor, data: BinaryRows) -> None:
        """Alg. 2, steps 8-10, as ``MLPStack.estimate_population`` computes them, on the kernel: E[x] = mean of mu_B
        and Var[x] = mean of m/(m-1) sigma2_B of every BN over the mini-batches ``examples`` (batches, m) of
        ``data``, each passed through the trained network frozen; into the stack's ``pop_mean{layer}``,
        ``pop_var{layer}`` and ``pop_batches``. The same results to float32 rounding, and the same refusals.

        Why on the kernel: a native run's evaluation then runs in one engine, on the kernel's threads like
        ``predict``, rather than as a large torch computation competing with them for the cores. Each thread takes
        whole runs of batches of one member, with a split that does not depend on the thread count, so any number
        of threads gives the same estimate bit for bit. The mini-batches are all of one size, as the runs draw
        them (the torch engine also takes batches of mixed sizes)."""
        stack = self.stack
        examples = self._mini_batches(examples, data)
        batches, m = examples.shape
        counted = batches if m >= 2 else 0  # a batch of one example has no variance: left out, as PopulationSums
        if stack.normalized and counted == 0:
            raise ValueError("population statistics need at least one mini-batch of two or more examples")
        if stack.normalized:  # plain members have no BN, so nothing to estimate (the torch pass records 0 batches)
            table, _ = self._train_table  # each BN member's weights, gamma and beta, where they are
            units = sum(stack.hidden)
            mean_sums = torch.empty(stack.normalized, units, dtype=torch.float64)
            var_sums = torch.empty(stack.normalized, units, dtype=torch.float64)
            status = self._population(*self._shape(), stack.bn_eps, stack.normalized, table, batches, m,
                                      examples.data_ptr(), data.offsets.data_ptr(), data.features.data_ptr(),
                                      mean_sums.data_ptr(), var_sums.data_ptr(), self.threads)
            _raise_for(status)
            start = 0
            for layer, width in enumerate(stack.hidden):  # (1, BN members * width), member after member
                found = slice(start, start + width)
                stack.get_buffer(f"pop_mean{layer}").copy_((mean_sums[:, found] / counted).reshape(1, -1))
                stack.get_buffer(f"pop_var{layer}").copy_((var_sums[:, found] / counted).reshape(1, -1))
                start += width
        stack.pop_batches.fill_(counted if stack.normalized else 0)
