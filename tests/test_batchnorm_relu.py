"""The fused BatchNorm+ReLU kernel computes what PyTorch's ops compute: compared in float64 (any
CPU), and in fp32 against a float64 reference."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniresnet import batchnorm_relu as fused_module
from miniresnet.batchnorm_relu import FusedBatchNormReLU, batchnorm_relu, kernel_available
from miniresnet.model import MiniResNet

# What torch.utils.cpp_extension needs to build the kernel: a C++ compiler and ninja.
HAS_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++")) and shutil.which("ninja") is not None
needs_kernel = pytest.mark.skipif(
    not (HAS_COMPILER and kernel_available()), reason="the fused kernel needs a C++ compiler and ninja to build"
)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def make_batch(channels: int, dtype: torch.dtype, seed: int = 0):
    """x (mean 2, spread 3: a variance that cancels badly if summed naively), a skip and dy."""
    g = torch.Generator().manual_seed(seed)
    shape = (6, channels, 5, 7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2
    skip, dy = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    weight, bias = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5, torch.randn(channels, generator=g)
    return [channels_last(t.to(dtype)) for t in (x, skip, dy)] + [weight.to(dtype), bias.to(dtype)]


def run(fused: bool, x, skip, dy, weight, bias, momentum=0.1, steps=2):
    """`steps` training-mode calls of batchnorm_relu (the kernel, or PyTorch's ops with the
    kernel's use switched off), then the output, the gradients and the running statistics."""
    bn = nn.BatchNorm2d(x.shape[1], momentum=momentum).to(x.dtype)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    xs = x.clone().requires_grad_()
    ss = skip.clone().requires_grad_() if skip is not None else None
    for _ in range(steps):
        if fused:
            y = batchnorm_relu(bn, xs, ss)
        else:
            out = bn(xs)
            y = torch.relu(out if ss is None else out + ss)
    y.backward(dy)
    results = [y, xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
    return results + ([ss.grad] if ss is not None else []), int(bn.num_batches_tracked)


def test_the_kernel_builds_where_there_is_a_compiler():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler or no ninja on this machine: training uses PyTorch's ops")
    assert kernel_available()


@needs_kernel
@pytest.mark.parametrize("channels", [3, 16])
@pytest.mark.parametrize("with_skip", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_matches_pytorch_in_float64(channels, with_skip, momentum):
    x, skip, dy, weight, bias = make_batch(channels, torch.float64)
    skip = skip if with_skip else None
    fused, fused_count = run(True, x, skip, dy, weight, bias, momentum)
    eager, eager_count = run(False, x, skip, dy, weight, bias, momentum)
    assert fused_count == eager_count == 2
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("with_skip", [False, True])
def test_fused_fp32_stays_near_a_float64_reference(with_skip):
    """fp32 rounding only: each result within 1e-6 of the float64 one, relative to its largest
    entry (the kernel measured 0.8-1.7e-7, PyTorch's fp32 ops 2.2-4.6e-7, capped to AVX2 and not;
    with its fp32 partial sums over 256 rows instead of 16, the kernel measured 2e-6 and failed)."""
    batch = make_batch(16, torch.float64, seed=1)
    reference, _ = run(False, *batch[:1], batch[1] if with_skip else None, *batch[2:])
    batch32 = [t.float() for t in batch]
    fused, _ = run(True, batch32[0], batch32[1] if with_skip else None, *batch32[2:])
    for a, b in zip(fused, reference, strict=True):
        assert a.dtype == torch.float32
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-6


@needs_kernel
def test_training_a_model_with_the_kernel_matches_pytorchs_ops_in_float64():
    torch.manual_seed(0)
    images, labels = channels_last(torch.randn(8, 3, 16, 16, dtype=torch.float64)), torch.randint(0, 10, (8,))
    models = []
    for fused in (True, False):
        torch.manual_seed(1)
        model = MiniResNet((4, 8, 16)).double().to(memory_format=torch.channels_last).use_fused_kernel(fused)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        models.append(model)
    fused_state, eager_state = (m.state_dict() for m in models)
    assert fused_state.keys() == eager_state.keys()
    for key in fused_state:
        torch.testing.assert_close(fused_state[key], eager_state[key], rtol=1e-10, atol=1e-12, msg=key)
    model = models[0].eval()
    torch.testing.assert_close(model(images), models[1].eval()(images), rtol=1e-10, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize(
    "case",
    ["nchw", "bf16", "evaluation", "one value per channel", "a BatchNorm2d subclass"],
)
def test_pytorchs_ops_run_where_the_kernel_does_not_apply(case, monkeypatch):
    def must_not_run(*args):
        raise AssertionError("the fused kernel ran")

    monkeypatch.setattr(FusedBatchNormReLU, "apply", must_not_run)
    x = channels_last(torch.randn(4, 8, 3, 3))
    bn = nn.BatchNorm2d(8)
    if case == "nchw":
        x = x.contiguous()
    elif case == "bf16":
        x, bn = x.bfloat16(), bn.bfloat16()
    elif case == "evaluation":
        bn.eval()
    elif case == "one value per channel":
        x = x[:1, :, :1, :1]
    else:
        bn = type("SubclassedBatchNorm", (nn.BatchNorm2d,), {})(8)
    if case == "one value per channel":
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            batchnorm_relu(bn, x)
        return
    expected = torch.relu(nn.BatchNorm2d(8).to(x.dtype).train(bn.training)(x))
    torch.testing.assert_close(batchnorm_relu(bn, x), expected)


def test_a_failed_build_falls_back_to_pytorchs_ops_and_says_so_once(monkeypatch, capsys):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'miniresnet_batchnorm_relu'\nc++: not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(fused_module, "kernel_registered", lambda: False)  # as in a process that never loaded it
    fused_module.kernel_available.cache_clear()
    try:
        x = channels_last(torch.randn(4, 8, 3, 3))
        assert not kernel_available()
        expected = torch.relu(nn.BatchNorm2d(8)(x))
        torch.testing.assert_close(batchnorm_relu(nn.BatchNorm2d(8), x), expected)
        message = capsys.readouterr().err
        assert message.count("could not be built") == 1
        assert "Error building extension 'miniresnet_batchnorm_relu'" in message
    finally:
        fused_module.kernel_available.cache_clear()  # the next test builds (or loads) it again
