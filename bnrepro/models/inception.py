"""The paper's Inception network (Appendix, Fig. 5), with and without BN, from one table of widths.

This is *not* GoogLeNet: the 5x5 convolutions are replaced by two 3x3 (the "double 3x3" branch), the
filter counts differ, 3c and 4e downsample inside the module, and there are no auxiliary classifiers.
The switches cover every variant of Secs. 4.2-4.2.3: BN before every nonlinearity (convolutional BN,
conv bias dropped) or none; ReLU or sigmoid; LRN after the stem's first and third convolutions (the
baseline's GoogLeNet heritage) or none; dropout before the classifier; per-activation BN in the last
hidden layer (ensemble members); a scale on the initial conv weights; a plain or separable stem conv.
The paper leaves open, and the recipe states: the conv and classifier initialisation, and whether the
modules' average pools count the zero padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bnrepro.models.batchnorm import BatchNorm, fold_linear
from bnrepro.recipes import InceptionModel


@dataclass(frozen=True)
class Module:
    """One row of the Fig. 5 table. ``pool`` is "avg"/"max" with a 1x1 projection of ``proj`` filters, or
    "pass" (max pool, stride 2, no projection) in the downsampling modules, whose 1x1 branch is absent."""

    name: str
    n1x1: int
    n3x3_reduce: int
    n3x3: int
    double_reduce: int
    double: int
    pool: Literal["avg", "max", "pass"]
    proj: int

    @property
    def stride(self) -> int:
        return 2 if self.pool == "pass" else 1

    def out_channels(self, in_channels: int) -> int:
        return self.n1x1 + self.n3x3 + self.double + (in_channels if self.pool == "pass" else self.proj)

    def scaled(self, width: float) -> Module:
        """This row with every filter count times ``width`` (the CPU profile's narrower network)."""
        counts = {name: scale_width(getattr(self, name), width)
                  for name in ("n1x1", "n3x3_reduce", "n3x3", "double_reduce", "double", "proj")}
        return Module(self.name, pool=self.pool, **counts)


def scale_width(filters: int, width: float) -> int:
    """``filters`` x ``width``, rounded, at least 1 where the table has any (0 stays 0: an absent branch)."""
    return max(1, round(filters * width)) if filters else 0


# Fig. 5 of the paper, as given in shared/paper/README.md section 5 (4c/4d sum to 608, 4e to 1056).
FIG5 = (
    Module("3a", 64, 64, 64, 64, 96, "avg", 32),
    Module("3b", 64, 64, 96, 64, 96, "avg", 64),
    Module("3c", 0, 128, 160, 64, 96, "pass", 0),
    Module("4a", 224, 64, 96, 96, 128, "avg", 128),
    Module("4b", 192, 96, 128, 96, 128, "avg", 128),
    Module("4c", 160, 128, 160, 128, 160, "avg", 128),
    Module("4d", 96, 128, 192, 160, 192, "avg", 128),
    Module("4e", 0, 128, 192, 192, 256, "pass", 0),
    Module("5a", 352, 192, 320, 160, 224, "avg", 128),
    Module("5b", 352, 192, 320, 192, 224, "max", 128),
)
PAPER_PARAMETERS = 13.6e6  # stated in Sec. 4.2; the table above counts to fewer (see README)


def switches(**changes: Any) -> InceptionModel:
    """The Fig. 5 network's switches (a recipe's ``model:`` section, validated as one) for a network built
    outside a recipe (tests, benchmarks): a small network to test (BN, ReLU, plain stem, no LRN, no dropout)
    with ``changes``, e.g. ``switches(batch_norm=False)``.

    Fixed values here rather than a recipe's (recipes/imagenet/ states the paper's networks): a test that
    changes one switch then builds the same network whatever a recipe later changes."""
    defaults = dict(batch_norm=True, nonlinearity="relu", lrn=False, lrn_size=5, lrn_alpha=1e-4, lrn_beta=0.75,
                    lrn_k=1.0, dropout=0.0, per_activation_bn=False, init_scale=1.0, conv_init="he_normal",
                    classifier_init_std=0.01, pool_count_include_pad=False, stem="plain", depth_multiplier=8,
                    bn_eps=1e-3, bn_momentum=0.01)
    return InceptionModel(**{**defaults, **changes})


@dataclass(frozen=True)
class InceptionConfig:
    """The network to build: the recipe's switches and what the recipe does not say (the profile's width,
    the data's classes and channels)."""

    model: InceptionModel  # the recipe's ``model:`` section (or ``switches()``)
    width: float = 1.0  # multiplies every filter count of Fig. 5, the stem's too (1: the paper's network)
    num_classes: int = 1000
    in_channels: int = 3


def _he_truncated_normal(weight: Tensor) -> None:
    """TF-slim's ``variance_scaling_initializer()`` (factor 2, fan-in, truncated normal): cut at 2 std, with
    the std widened by sqrt(1.3) so the truncated weights keep a variance of about 2 / fan-in."""
    std = math.sqrt(1.3 * 2 / weight[0].numel())
    nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def _lecun_uniform(weight: Tensor) -> None:
    """Caffe's "xavier" filler (its default fan-in form, as in GoogLeNet's prototxt): U(+-sqrt(3 / fan-in))."""
    bound = math.sqrt(3 / weight[0].numel())
    nn.init.uniform_(weight, -bound, bound)


# The initial conv weights, before ``init_scale`` (fan-in counts one output filter: in/groups x kh x kw).
CONV_INIT = {
    "he_normal": lambda weight: nn.init.kaiming_normal_(weight, nonlinearity="relu"),  # N(0, 2 / fan-in)
    "he_truncated_normal": _he_truncated_normal,
    "lecun_uniform": _lecun_uniform,
}


def _nonlinearity(name: str) -> nn.Module:
    return nn.ReLU(inplace=True) if name == "relu" else nn.Sigmoid()


class ConvUnit(nn.Sequential):
    """conv -> [BN] -> nonlinearity: with BN the conv has no bias (beta replaces it, Sec. 3.2)."""

    def __init__(self, model: InceptionModel, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=not model.batch_norm, groups=groups)
        layers: list[nn.Module] = [conv]
        if model.batch_norm:
            layers.append(BatchNorm((1, cout, 1, 1), (0, 2, 3), model.bn_eps, model.bn_momentum))
        layers.append(_nonlinearity(model.nonlinearity))
        super().__init__(*layers)


class SeparableStem(nn.Sequential):
    """The paper's first layer: a depthwise 7x7 (``depth_multiplier`` filters per input channel) followed by
    a pointwise 1x1 to 64 maps; BN and the nonlinearity come after the pair."""

    def __init__(self, model: InceptionModel, cin: int, cout: int):
        depthwise = nn.Conv2d(cin, cin * model.depth_multiplier, 7, 2, padding=3, groups=cin, bias=False)
        pointwise = ConvUnit(model, cin * model.depth_multiplier, cout, 1)
        super().__init__(depthwise, pointwise)


class InceptionModule(nn.Module):
    """Four parallel branches concatenated along channels (Fig. 5 row ``spec``).

    The three 1x1 convolutions that read the module's input (the 1x1 branch, the 3x3 reduce and the double-3x3
    reduce) are one convolution with their filters side by side, followed by one BN over those channels: the
    same arithmetic (BN's statistics are per channel), in one kernel instead of three; measured 15% faster
    training at width 1/4 and 32 px on 2 CPU cores. ``entry`` is split back into the branches' inputs.
    """

    def __init__(self, model: InceptionModel, spec: Module, cin: int):
        super().__init__()
        s = spec.stride
        self.widths = [spec.n1x1, spec.n3x3_reduce, spec.double_reduce]  # the 1x1 branch may be absent (0)
        self.entry = ConvUnit(model, cin, sum(self.widths), 1)
        self.branch3x3 = ConvUnit(model, spec.n3x3_reduce, spec.n3x3, 3, s)
        self.double3x3 = nn.Sequential(ConvUnit(model, spec.double_reduce, spec.double, 3),
                                       ConvUnit(model, spec.double, spec.double, 3, s))
        if spec.pool == "pass":
            self.pool = nn.MaxPool2d(3, 2, padding=1)
        else:
            pool = nn.AvgPool2d(3, 1, padding=1, count_include_pad=model.pool_count_include_pad) \
                if spec.pool == "avg" else nn.MaxPool2d(3, 1, padding=1)
            self.pool = nn.Sequential(pool, ConvUnit(model, cin, spec.proj, 1))
        self.out_channels = spec.out_channels(cin)

    def forward(self, x: Tensor) -> Tensor:
        single, reduced, double_reduced = self.entry(x).split(self.widths, 1)
        branches = [self.branch3x3(reduced), self.double3x3(double_reduced), self.pool(x)]
        return torch.cat([single, *branches] if self.widths[0] else branches, 1)


class Inception(nn.Module):
    """Fig. 5: stem, modules 3a-5b, global average pooling, [dropout], [per-activation BN], softmax layer.

    Any input resolution works (the final pool is global), so the same network trains on small proxy data.
    """

    def __init__(self, cfg: InceptionConfig):
        super().__init__()
        self.cfg = cfg
        model = cfg.model
        c64, c192 = scale_width(64, cfg.width), scale_width(192, cfg.width)
        stem: list[nn.Module] = [SeparableStem(model, cfg.in_channels, c64) if model.stem == "separable"
                                 else ConvUnit(model, cfg.in_channels, c64, 7, 2),
                                 nn.MaxPool2d(3, 2, padding=1)]
        if model.lrn:
            stem.append(nn.LocalResponseNorm(model.lrn_size, model.lrn_alpha, model.lrn_beta, model.lrn_k))
        stem += [ConvUnit(model, c64, c64, 1), ConvUnit(model, c64, c192, 3)]
        if model.lrn:
            stem.append(nn.LocalResponseNorm(model.lrn_size, model.lrn_alpha, model.lrn_beta, model.lrn_k))
        stem.append(nn.MaxPool2d(3, 2, padding=1))
        self.stem = nn.Sequential(*stem)
        modules, channels = [], c192
        for spec in FIG5:
            module = InceptionModule(model, spec.scaled(cfg.width), channels)
            modules.append(module)
            channels = module.out_channels
        self.inception = nn.Sequential(*modules)
        self.features = channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(model.dropout)
        self.head_bn = (BatchNorm((1, channels), (0,), model.bn_eps, model.bn_momentum) if model.per_activation_bn
                        else None)
        self.classifier = nn.Linear(channels, cfg.num_classes)
        self._initialise()

    def _initialise(self) -> None:
        model = self.cfg.model
        initialise = CONV_INIT[model.conv_init]  # InceptionModel admits only CONV_INIT's names
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                initialise(m.weight)
                m.weight.data.mul_(model.init_scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, std=model.classifier_init_std)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.inception(self.stem(x))).flatten(1)
        x = self.dropout(x)
        if self.head_bn is not None:
            x = self.head_bn(x)
        return self.classifier(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, resolution: int) -> int:
    """Multiply-adds of convolutions and the classifier for one image (the usual "FLOPs" of the papers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inp, out: Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += out.shape[1] * out.shape[2] * out.shape[3] * k

    def linear_hook(module: nn.Linear, _inp, _out) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    training = model.training
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device  # where the model is: a CPU image fails on a GPU model
        model(torch.zeros(1, model.cfg.in_channels, resolution, resolution, device=device))
    model.train(training)
    for hook in hooks:
        hook.remove()
    return total


@torch.no_grad()
def fold(model: Inception) -> Inception:
    """The inference network of Alg. 2: every BN, with its population statistics (``estimate_population``),
    merged into the convolution before it (a new model)."""
    without_bn = model.cfg.model.model_copy(update={"batch_norm": False, "per_activation_bn": False})
    folded = Inception(replace(model.cfg, model=without_bn)).to(next(model.parameters()))  # same device and dtype
    source = [m for m in model.modules() if isinstance(m, ConvUnit)]
    target = [m for m in folded.modules() if isinstance(m, ConvUnit)]
    for unit, plain in zip(source, target, strict=True):
        conv, bn, out = unit[0], unit[1], plain[0]
        scale, shift = bn.affine("population")
        weight, bias = fold_linear(conv.weight, None, scale.view(-1, 1, 1, 1), shift.view(-1))
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    if model.cfg.model.stem == "separable":  # the depthwise conv has no BN of its own: copied as it is
        folded.stem[0][0].weight.copy_(model.stem[0][0].weight)
    classifier_weight, classifier_bias = model.classifier.weight, model.classifier.bias
    if model.head_bn is not None:  # y = W(scale*x + shift) + b
        scale, shift = model.head_bn.affine("population")
        classifier_bias = classifier_bias + classifier_weight @ shift.view(-1)
        classifier_weight = classifier_weight * scale.view(1, -1)
    folded.classifier.weight.copy_(classifier_weight)
    folded.classifier.bias.copy_(classifier_bias)
    return folded.eval()
