"""The Fig. 5 network: shapes, parameter counts from the table, BN placement, switches, folding."""

from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from bnrepro.models.batchnorm import BatchNorm, estimate_population, use_statistics
from bnrepro.models.inception import (
    CONV_INIT,
    FIG5,
    ConvUnit,
    Inception,
    InceptionConfig,
    InceptionModule,
    count_flops,
    count_parameters,
    fold,
    switches,
)
from bnrepro.recipes import InceptionModel

# Fig. 5, typed from shared/paper/README.md section 5 (not read from FIG5, the constant under test):
# #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, proj, out channels ("pass" = max pool
# pass-through in the stride-2 modules, no projection; 4c/4d/4e out as the filter counts sum, see the README).
PAPER_TABLE = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 256),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 320),
    "3c": (0, 128, 160, 64, 96, "pass", 0, 576),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 576),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 576),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 608),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 608),
    "4e": (0, 128, 192, 192, 256, "pass", 0, 1056),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1024),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1024),
}
MODULE_OUT = [row[-1] for row in PAPER_TABLE.values()]


def test_fig5_is_the_papers_table():
    assert {m.name: (m.n1x1, m.n3x3_reduce, m.n3x3, m.double_reduce, m.double, m.pool, m.proj) for m in FIG5} \
        == {name: row[:-1] for name, row in PAPER_TABLE.items()}
    assert [m.name for m in FIG5] == list(PAPER_TABLE)  # in the table's order
    cin, outs = 192, []
    for m in FIG5:
        cin = m.out_channels(cin)
        outs.append(cin)
    assert outs == MODULE_OUT


def table_parameters(num_classes: int, bias: bool) -> int:
    """Parameters counted by hand from the typed Fig. 5 table (plain stem), independently of the model code."""
    def conv(k, cin, cout):
        return k * k * cin * cout + (cout if bias else 2 * cout)  # a conv bias, or BN's gamma and beta

    total = conv(7, 3, 64) + conv(1, 64, 64) + conv(3, 64, 192)
    cin = 192
    for n1x1, n3x3_reduce, n3x3, double_reduce, double, pool, proj, out in PAPER_TABLE.values():
        if n1x1:
            total += conv(1, cin, n1x1)
        total += conv(1, cin, n3x3_reduce) + conv(3, n3x3_reduce, n3x3)
        total += conv(1, cin, double_reduce) + conv(3, double_reduce, double) + conv(3, double, double)
        if pool != "pass":
            total += conv(1, cin, proj)
        cin = out
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("batch_norm", [True, False])
def test_parameter_count_matches_the_table(batch_norm):
    model = Inception(InceptionConfig(switches(batch_norm=batch_norm, stem="plain")))
    assert count_parameters(model) == table_parameters(1000, bias=not batch_norm)
    assert 11.2e6 < count_parameters(model) < 11.4e6  # the table counts ~11.3M, not the paper's 13.6M


def test_channel_flow_and_spatial_sizes_at_224():
    model = Inception(InceptionConfig(switches(stem="plain"))).eval()
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
             for m in model.inception]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    for h in hooks:
        h.remove()
    assert [s[0] for s in sizes] == MODULE_OUT
    assert [s[1] for s in sizes] == [28, 28, 14, 14, 14, 14, 14, 7, 7, 7]
    assert 1.9e9 < count_flops(model, 224) < 2.2e9  # multiply-adds per image


@pytest.mark.parametrize("resolution,classes", [(32, 10), (64, 7), (96, 3)])
def test_small_resolutions(resolution, classes):
    model = Inception(InceptionConfig(switches(), num_classes=classes, in_channels=1))
    assert model(torch.randn(2, 1, resolution, resolution)).shape == (2, classes)


def test_one_bn_per_nonlinearity_and_no_conv_bias_under_bn():
    model = Inception(InceptionConfig(switches(batch_norm=True, stem="plain")))
    units = [m for m in model.modules() if isinstance(m, ConvUnit)]
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(units) == len(norms) == len(relus) > 50
    for unit in units:
        conv, bn, act = unit
        assert conv.bias is None and isinstance(bn, BatchNorm) and bn.gamma.shape == (1, conv.out_channels, 1, 1)
    plain = Inception(InceptionConfig(switches(batch_norm=False, stem="plain")))
    assert not any(isinstance(m, BatchNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))


def test_switches():
    count = lambda model, kind: sum(isinstance(m, kind) for m in model.modules())  # noqa: E731
    assert count(Inception(InceptionConfig(switches(lrn=True))), nn.LocalResponseNorm) == 2
    assert count(Inception(InceptionConfig(switches(lrn=False))), nn.LocalResponseNorm) == 0
    assert Inception(InceptionConfig(switches(dropout=0.4))).dropout.p == 0.4
    sigmoid = Inception(InceptionConfig(switches(nonlinearity="sigmoid")))
    assert count(sigmoid, nn.Sigmoid) > 50 and count(sigmoid, nn.ReLU) == 0
    assert Inception(InceptionConfig(switches(per_activation_bn=True))).head_bn.gamma.shape == (1, 1024)
    assert Inception(InceptionConfig(switches())).head_bn is None
    separable = Inception(InceptionConfig(switches(stem="separable", depth_multiplier=8)))
    depthwise = separable.stem[0][0]
    assert depthwise.groups == 3 and depthwise.out_channels == 24 and depthwise.kernel_size == (7, 7)
    torch.manual_seed(0)
    a = Inception(InceptionConfig(switches(init_scale=1.0)))
    torch.manual_seed(0)
    b = Inception(InceptionConfig(switches(init_scale=2.0)))
    first_a, first_b = (next(m for m in x.modules() if isinstance(m, nn.Conv2d)) for x in (a, b))
    torch.testing.assert_close(first_b.weight, 2 * first_a.weight)


@pytest.mark.parametrize("scheme,variance,bound", [("he_normal", 2, None),
                                                    ("he_truncated_normal", 2.6 * 0.774, 2 * 2.6 ** 0.5),
                                                    ("lecun_uniform", 1, 3 ** 0.5)])
def test_conv_init_schemes(scheme, variance, bound):
    """Weight variance x fan-in: 2 (He), 1 (LeCun/Caffe "xavier"); the truncated normal is cut at 2 of its
    std sqrt(2.6 / fan-in), which keeps 0.774 of its variance (about 2). ``bound`` is max |w| x sqrt(fan-in)."""
    torch.manual_seed(0)
    model = Inception(InceptionConfig(switches(stem="plain", conv_init=scheme)))
    conv = model.inception[-1].double3x3[1][0]  # 5b's last double-3x3 conv: 224 x 224 x 3 x 3 weights
    fan_in = conv.weight[0].numel()
    assert fan_in == 224 * 9
    assert conv.weight.var().item() * fan_in == pytest.approx(variance, rel=0.02)
    assert abs(conv.weight.mean().item()) * fan_in ** 0.5 < 0.01
    if bound is not None:
        assert conv.weight.abs().max().item() * fan_in ** 0.5 <= bound + 1e-6
    torch.manual_seed(0)
    scaled = Inception(InceptionConfig(switches(stem="plain", conv_init=scheme, init_scale=1.5)))
    torch.testing.assert_close(scaled.inception[-1].double3x3[1][0].weight, 1.5 * conv.weight)
    with pytest.raises(ValidationError, match="conv_init"):  # the recipe's schema lists the schemes
        switches(conv_init="orthogonal")
    assert set(get_args(InceptionModel.model_fields["conv_init"].annotation)) == set(CONV_INIT)


def test_classifier_init_std_and_the_average_pools_padding_count():
    torch.manual_seed(0)
    model = Inception(InceptionConfig(switches(classifier_init_std=0.05)))
    assert model.classifier.weight.std().item() == pytest.approx(0.05, rel=0.02)
    assert (model.classifier.bias == 0).all()
    for include in (False, True):
        pools = [m for m in Inception(InceptionConfig(switches(pool_count_include_pad=include))).modules()
                 if isinstance(m, nn.AvgPool2d)]
        assert len(pools) == 7 and all(p.count_include_pad is include for p in pools)  # the 7 "avg" modules
        corner = pools[0](torch.ones(1, 1, 4, 4))[0, 0, 0, 0].item()
        assert corner == pytest.approx(4 / 9 if include else 1.0)  # a corner sees 4 of 9 in-image values


@pytest.mark.parametrize("cfg", [InceptionConfig(switches(stem="plain"), num_classes=5),
                                 InceptionConfig(switches(stem="separable", per_activation_bn=True), num_classes=5)])
def test_fold_matches_the_bn_network(cfg):
    torch.manual_seed(0)
    model = Inception(cfg).double()
    model.train()
    with torch.no_grad():
        for _ in range(3):  # populate the moving averages, and move gamma/beta off 1/0
            model(torch.randn(6, 3, 32, 32, dtype=torch.float64))
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.gamma.uniform_(0.5, 1.5)
                m.beta.normal_(0, 0.1)
    batches = [torch.randn(6, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    assert estimate_population(model, lambda: [model(x) for x in batches]) == 2
    model.eval()
    use_statistics(model, "population")  # the network the fold must equal: BN with Alg. 2's statistics
    folded = fold(model).double()
    assert not any(isinstance(m, BatchNorm) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-9)


def test_channels_last_and_bf16_autocast():
    model = Inception(InceptionConfig(switches(), num_classes=10)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = Inception(InceptionConfig(switches(stem="plain"), num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_merged_entry_convolution_computes_the_three_1x1_branches():
    """The module's three 1x1 convolutions on its input run as one (filters side by side) with one BN: each
    branch gets exactly what its own conv, BN (per-channel batch statistics) and ReLU would give it."""
    torch.manual_seed(0)
    spec = FIG5[0].scaled(0.25)
    module = InceptionModule(switches(), spec, 48).double().train()
    with torch.no_grad():
        module.entry[1].gamma.uniform_(0.5, 1.5)
        module.entry[1].beta.uniform_(-0.5, 0.5)
    x = torch.randn(4, 48, 8, 8, dtype=torch.float64)
    weight, bn = module.entry[0].weight, module.entry[1]
    gamma, beta = bn.gamma.view(-1), bn.beta.view(-1)
    own, start = [], 0
    for width in (spec.n1x1, spec.n3x3_reduce, spec.double_reduce):
        part = slice(start, start + width)
        z = F.conv2d(x, weight[part])
        own.append(torch.relu(F.batch_norm(z, None, None, gamma[part], beta[part], training=True, eps=bn.eps)))
        start += width
    with torch.no_grad():
        want = torch.cat([own[0], module.branch3x3(own[1]), module.double3x3(own[2]), module.pool(x)], 1)
        torch.testing.assert_close(module(x), want, rtol=1e-12, atol=1e-12)
    assert module(x).shape[1] == spec.out_channels(48)


def test_multiply_adds_are_counted_where_the_model_is():
    """``bnrepro reproduce --dry-run`` counts them on the training device: a CPU image fed to a GPU model failed
    there (the GPU check). The meta device stands in for a GPU: any CPU tensor mixed in fails the same way."""
    cfg = InceptionConfig(switches(), num_classes=10, width=0.25)
    assert count_flops(Inception(cfg).to("meta"), 32) == count_flops(Inception(cfg), 32)
