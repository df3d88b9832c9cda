"""Tests on the real CIFAR-10 (MINIRESNET_CIFAR10); each skips with a reason when it is absent."""

import json
import subprocess
import sys

import pytest
import torch

from miniresnet import load_model
from miniresnet.augment import channel_stats
from miniresnet.data import load_cifar10
from miniresnet.evaluate import metrics, predict_logits
from miniresnet.pretrained import shipped_cards


def test_real_data_loads_whole_and_balanced(real_data):
    data = load_cifar10(real_data)  # verifies every file's published MD5 first
    assert data.train_images.shape == (50_000, 3, 32, 32) and data.test_images.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [5_000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1_000] * 10
    mean, std = channel_stats(data.train_images)
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-3)
    assert torch.allclose(std, torch.tensor([0.2470, 0.2435, 0.2616]), atol=1e-3)


def test_one_epoch_of_the_seed_preset_is_well_above_chance(real_data, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "miniresnet",
            "train",
            "--preset",
            "seed",
            "--epochs",
            "1",
            "--data-dir",
            str(real_data),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["test_acc"] > 0.35  # chance is 0.10; one seed-preset epoch reached 0.47 here
    assert summary["epochs"] == 1


@pytest.mark.parametrize("name", sorted(shipped_cards()))
def test_each_shipped_model_has_the_accuracy_its_card_states(real_data, name):
    """Evaluation is deterministic on one machine, so on the machine that wrote the card this is
    exact. Another CPU's fp32 kernels round differently and may flip the few test images whose top
    two logits are nearly tied: up to 5 of 10,000 (0.05 points) are allowed for that."""
    card = shipped_cards()[name]
    data = load_cifar10(real_data)
    model = load_model(name)
    for tta, stated in (
        ("none", card["test_accuracy"]["plain"]),
        (card["test_accuracy"]["tta_mode"], card["test_accuracy"]["tta"]),
    ):
        result = metrics(
            predict_logits(model, data.test_images, model.mean, model.std, tta=tta), data.test_labels, model.classes
        )
        assert result["n"] == 10_000 and abs(result["accuracy"] - stated) <= 0.0005, (tta, result["accuracy"], stated)


@pytest.mark.parametrize("name", sorted(shipped_cards()))
def test_each_shipped_model_has_the_jpeg_accuracy_and_calibration_its_card_states(real_data, name):
    """The card's other figures: plain accuracy on the test set re-encoded as JPEG at quality 75
    (Pillow, 4:2:0), and the expected calibration error (15 bins) with and without the file's
    temperature. The same allowance as above for another CPU's rounding: 5 images of 10,000, which
    also bounds how far the ECE can move (each image shifts it by at most 1/10,000 per bin it leaves)."""
    from miniresnet.calibration import calibration_error
    from miniresnet.images import jpeg_roundtrip

    card = shipped_cards()[name]
    data = load_cifar10(real_data)
    model = load_model(name)
    jpeg = jpeg_roundtrip(data.test_images, 75, progress=False)
    result = metrics(predict_logits(model, jpeg, model.mean, model.std), data.test_labels, model.classes)
    assert abs(result["accuracy"] - card["jpeg75_test_accuracy"]["plain"]) <= 0.0005, result["accuracy"]
    logits = predict_logits(model, data.test_images, model.mean, model.std)
    calibration = card["calibration"]
    assert model.temperature == pytest.approx(calibration["temperature"])
    for ece, temperature in (("test_ece", 1.0), ("test_ece_calibrated", model.temperature)):
        assert calibration_error(logits, data.test_labels, temperature) == pytest.approx(calibration[ece], abs=0.001)
