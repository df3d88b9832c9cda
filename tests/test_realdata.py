"""Tests on the real CIFAR-10 (MINIRESNET_CIFAR10); each skips with a reason when it is absent."""

import json
import subprocess
import sys

import torch

from miniresnet.augment import channel_stats
from miniresnet.data import load_cifar10


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
