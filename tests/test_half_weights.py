"""Weights held in bf16 with BatchNorm in fp32 (--precision bf16-weights): what the model holds,
how close its forward pass is to float64, and a run that trains, saves, loads and resumes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import interrupt_training_at, tiny_config
from miniresnet import runtime
from miniresnet.checkpoint import load_checkpoint, load_model
from miniresnet.errors import MiniResNetError
from miniresnet.model import MiniResNet
from miniresnet.train import train


def test_the_weights_are_bf16_and_batchnorm_stays_fp32():
    model = runtime.model_in_precision(MiniResNet(), runtime.BF16_WEIGHTS)
    for module in model.modules():
        expected = torch.float32 if isinstance(module, torch.nn.BatchNorm2d) else torch.bfloat16
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point():
                assert tensor.dtype == expected, (module, name)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 15


def test_the_forward_pass_is_the_float64_one_to_bf16_rounding():
    """Trained-looking statistics (a few batches in train mode), then eval: the logits of bf16
    weights and inputs agree with float64's to the few percent that bf16's 8 bits allow, and the
    class they rank first mostly agrees."""
    torch.manual_seed(0)
    reference = MiniResNet().double()
    reference.train()
    with torch.no_grad():
        for _ in range(3):
            reference(torch.randn(64, 3, 32, 32, dtype=torch.float64))
    half = runtime.model_in_precision(MiniResNet(), runtime.BF16_WEIGHTS)
    half.load_state_dict(reference.state_dict())
    x = torch.randn(256, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = reference.eval()(x)
        got = half.eval()(x.bfloat16()).double()
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.05 * scale
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.9


def test_bf16_weights_resolve_only_where_bf16_is_native(monkeypatch, capsys):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_precision("bf16-weights", cpu) == runtime.BF16_WEIGHTS
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("bf16-weights", cpu) == runtime.FP32
    assert "lacks native bf16" in capsys.readouterr().err


def test_ema_with_bf16_weights_is_refused(tiny_data, tmp_path):
    with pytest.raises(MiniResNetError, match="bf16-weights is too coarse"):
        train(tiny_config(tiny_data, tmp_path / "run", precision="bf16-weights", ema=0.99))


def test_a_bf16_weights_run_trains_saves_loads_and_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # emulated where it is not: slower, the same
    recipe = dict(epochs=2, optimizer="sgd", lr=0.05, schedule="linear", label_smoothing=0.1, precision="bf16-weights")
    cfg = tiny_config(tiny_data, tmp_path / "whole", **recipe)
    whole = train(cfg)
    assert whole["precision"] == "bf16-weights"
    saved = load_checkpoint(tmp_path / "whole" / "last.pt")["weights"]
    assert saved["fc.weight"].dtype == torch.bfloat16 and saved["features.0.1.running_var"].dtype == torch.float32
    model = load_model(tmp_path / "whole" / "last.pt")  # a plain fp32 model, for predict, export and serve
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(model.fc.weight, saved["fc.weight"].float(), rtol=0, atol=0)

    broken = dataclasses.replace(cfg, out_dir=str(tmp_path / "broken"))
    restore_schedule = interrupt_training_at(monkeypatch, 11)  # mid-epoch 2 (8 steps an epoch)
    with pytest.raises(MiniResNetError, match="--resume"):
        train(broken)
    restore_schedule()
    resumed = train(broken, resume=True)
    assert resumed["test_acc"] == whole["test_acc"] and resumed["test_loss"] == whole["test_loss"]
    again = load_checkpoint(tmp_path / "broken" / "last.pt")["weights"]
    assert all(torch.equal(again[k], saved[k]) for k in saved)
