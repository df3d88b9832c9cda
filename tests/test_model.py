import pytest
import torch
from torch import nn

from conftest import script_module
from miniresnet.errors import MiniResNetError
from miniresnet.model import MiniResNet, ResidualBlock, count_macs, count_parameters


def conv(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out  # a 3x3 convolution's weights (no bias)


def bn(c: int) -> int:
    return 2 * c  # BatchNorm's scale and shift


def expected_counts(widths=(16, 32, 64), blocks=2, classes=10):
    """Parameters and MACs worked out layer by layer from the spec, independently of the model code."""
    params, macs, side = conv(3, widths[0]) + bn(widths[0]), conv(3, widths[0]) * 32 * 32, 32
    for i, w in enumerate(widths):
        if i:
            side //= 2
            params += conv(widths[i - 1], w) + bn(w)
            macs += conv(widths[i - 1], w) * side * side
        params += blocks * 2 * (conv(w, w) + bn(w))
        macs += blocks * 2 * conv(w, w) * side * side
    params += widths[-1] * classes + classes
    macs += widths[-1] * classes
    return params, macs


def test_output_shape_and_finite():
    model = MiniResNet()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()


def test_structure_matches_the_seed_spec():
    model = MiniResNet()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert [b.conv1.in_channels for b in blocks] == [16, 16, 32, 32, 64, 64]
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert [(m.in_channels, m.out_channels) for m in strided] == [(16, 32), (32, 64)]
    assert all(m.kernel_size == (3, 3) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.fc.in_features == 64 and model.fc.out_features == 10


def test_parameter_count_and_macs():
    model = MiniResNet()
    params, macs = expected_counts()
    assert count_parameters(model) == params == 218_778
    assert count_macs(model) == macs
    assert 30e6 < macs < 32e6  # ~62 MFLOP per forward pass


@pytest.mark.parametrize("widths,blocks", [((8, 16, 32), 1), ((16, 32, 64, 128), 3)])
def test_widths_and_depth_are_parameters(widths, blocks):
    model = MiniResNet(widths, blocks)
    params, macs = expected_counts(widths, blocks)
    assert count_parameters(model) == params
    assert count_macs(model) == macs
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_residual_block_is_identity_plus_branch():
    block = ResidualBlock(4).eval()
    nn.init.zeros_(block.bn2.weight)  # branch contributes nothing: output = relu(x)
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(block(x), torch.relu(x))


def test_count_macs_restores_training_mode():
    model = MiniResNet().train()
    count_macs(model)
    assert model.training


def test_whitened_stem_filters_decorrelate_the_patches_largest_directions_first():
    from miniresnet.model import whiten_stem

    generator = torch.Generator().manual_seed(0)
    # Patches dominated by each image's brightness, plus small per-pixel noise.
    images = torch.randn(64, 1, 1, 1, generator=generator, dtype=torch.float64) * 3
    images = images + 0.3 * torch.randn(64, 3, 12, 12, generator=generator, dtype=torch.float64)
    model = MiniResNet().double()
    whiten_stem(model, images)
    weight = model.features[0][0].weight.detach()
    k = weight.shape[0] // 2
    assert torch.equal(weight[k:], -weight[:k])
    outputs = torch.nn.functional.conv2d(images, weight[:k]).permute(1, 0, 2, 3).reshape(k, -1)
    covariance = torch.cov(outputs)
    assert torch.allclose(covariance, torch.eye(k, dtype=torch.float64), atol=1e-2)
    first = weight[0].reshape(-1)  # the brightness direction: all 27 weights equal
    assert torch.allclose(first / first.norm(), torch.full_like(first, 27**-0.5) * first.sign()[0], atol=1e-2)


def test_a_weight_average_is_the_mean_of_every_float_state_and_keeps_the_architecture():
    averaged = script_module("benchmarks/weight_average.py").averaged
    torch.manual_seed(0)
    first, second = MiniResNet().double(), MiniResNet().double()
    for model in (first, second):  # BatchNorm statistics that differ between the two, as after training
        model.train()(torch.randn(8, 3, 32, 32, dtype=torch.float64))
        model.eval()
    second.features[0][1].num_batches_tracked.fill_(7)
    soup = averaged([first, second])
    a, b, s = first.state_dict(), second.state_dict(), soup.state_dict()
    for key in s:
        if s[key].is_floating_point():
            assert torch.allclose(s[key], (a[key] + b[key]) / 2, rtol=0, atol=1e-15), key
    assert s["features.0.1.num_batches_tracked"].item() == a["features.0.1.num_batches_tracked"].item()
    assert first.state_dict()["features.0.1.weight"].data_ptr() != s["features.0.1.weight"].data_ptr()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(averaged([first, first])(x), first(x), rtol=0, atol=1e-12)
    with pytest.raises(MiniResNetError, match="one architecture"):
        averaged([first, MiniResNet(widths=(8, 16, 32)).double()])
