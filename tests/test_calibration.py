"""Honest probabilities: the temperature fitted on the validation split is the one that minimises
its loss, the expected calibration error is what its definition says, and the temperature travels
with the model (checkpoint, exports) into every answer (classify, predict, evaluate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from miniresnet import load_model
from miniresnet.calibration import calibration_error, fit_temperature, reliability
from miniresnet.checkpoint import load_checkpoint, model_from_checkpoint, read_model
from miniresnet.cli import main
from miniresnet.errors import MiniResNetError
from miniresnet.evaluate import classify, predict_logits
from miniresnet.train import calibration_line, train


def sampled(n: int, temperature: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits, and labels drawn from softmax(logits / temperature): `temperature` calibrates them."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=generator, dtype=torch.float64) * 4
    labels = torch.multinomial((logits / temperature).softmax(1), 1, generator=generator).flatten()
    return logits, labels


def test_the_fitted_temperature_minimises_the_loss():
    logits, labels = sampled(20_000, 2.5)
    fitted = fit_temperature(logits, labels)
    grid = torch.linspace(0.5, 6, 2_201, dtype=torch.float64)  # steps of 0.0025
    losses = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    assert abs(fitted - grid[losses.argmin()].item()) <= 0.003
    assert abs(fitted - 2.5) < 0.1  # and, with this many samples, the one the labels were drawn with


def test_the_calibration_error_is_its_definition():
    # Two images at confidence ~0.9 (one right), one at ~0.6 (right): bins 13 and 9 of 15.
    logits = torch.tensor([[math.log(9.0), 0.0], [math.log(9.0), 0.0], [math.log(1.5), 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    bins = reliability(logits, labels)
    assert [b["count"] for b in bins] == [0] * 9 + [1] + [0] * 3 + [2] + [0]
    expected = 2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1.0 - 0.6)
    assert calibration_error(logits, labels) == pytest.approx(expected, abs=1e-12)


def test_scaling_by_the_fitted_temperature_calibrates_overconfident_logits():
    logits, labels = sampled(20_000, 3.0, seed=1)  # the raw softmax is far too confident
    validation, test = slice(0, 10_000), slice(10_000, None)
    temperature = fit_temperature(logits[validation], labels[validation])
    before = calibration_error(logits[test], labels[test])
    after = calibration_error(logits[test], labels[test], temperature)
    assert before > 0.15 and after < 0.02


def test_a_run_fits_its_temperature_on_validation_and_every_answer_uses_it(tiny_data, tmp_path, capsys):
    summary = train(tiny_config(tiny_data, tmp_path / "run", epochs=2, val_split=60, label_smoothing=0.2))
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    temperature = checkpoint["temperature"]
    assert temperature != 1.0 and summary["temperature"] == temperature
    assert {"test_ece", "test_ece_calibrated"} <= summary.keys()
    assert "probabilities calibrated: temperature" in capsys.readouterr().err
    model = load_model(tmp_path / "run" / "last.pt")
    assert model.temperature == temperature
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    logits = predict_logits(model, images, model.mean, model.std)
    expected = (logits / temperature).softmax(1).max(1).values
    assert [round(top[0][1], 6) for top in classify(model, images, 1)] == pytest.approx(expected.tolist(), abs=1e-6)

    exported = tmp_path / "m.safetensors"
    args = ["export", str(tmp_path / "run" / "last.pt"), "--format", "safetensors", "--out", str(exported)]
    assert main([*args, "--data-dir", str(tiny_data), "--no-verify-data"]) == 0
    assert load_model(exported).temperature == temperature
    plots = tmp_path / "plots"
    evaluate = ["evaluate", str(exported), "--data-dir", str(tiny_data), "--no-verify-data", "--plots", str(plots)]
    capsys.readouterr()
    assert main(evaluate) == 0
    assert f"temperature {temperature:.3f}" in capsys.readouterr().out and (plots / "reliability.png").is_file()
    assert main([*evaluate, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["temperature"] == temperature and 0 <= result["ece"] <= 1
    run_result = json.loads((tmp_path / "run" / "test_eval.json").read_text())  # the run's own, at its temperature
    assert run_result["tta"] == "none" and run_result["temperature"] == temperature
    assert run_result["ece"] == pytest.approx(summary["test_ece_calibrated"], abs=1e-12)


def held_out_logits(model_file: Path, data_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model file's float64 logits on the last 50 of the tiny data's 200 training images (the
    ones `--val-split 50` holds out), with their labels and the model."""
    from miniresnet.data import load_dataset
    from miniresnet.runtime import model_in_precision, resolve_precision

    data = load_dataset("cifar10", data_dir, verify=False)
    fp64 = resolve_precision("fp64", torch.device("cpu"))
    model = model_in_precision(load_model(model_file), fp64, memory_format=torch.channels_last)
    logits = predict_logits(model, data.train_images[150:], model.mean, model.std, precision=fp64)
    return model, logits, data.train_labels[150:]


def test_best_pt_carries_the_temperature_of_its_own_epoch(tiny_data, tmp_path):
    """best.pt may come from an earlier epoch than last.pt (here epoch 2 of 3, seed 0): each file's
    temperature is the one fitted on the validation split for its own weights."""
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, epochs=3, val_split=50, precision="fp64", eval_every=1, seed=0))
    for name in ("best.pt", "last.pt"):
        model, logits, labels = held_out_logits(run / name, tiny_data)
        assert model.temperature == pytest.approx(fit_temperature(logits, labels), rel=1e-5), name


def test_a_validation_split_with_no_errors_gives_no_temperature():
    logits = torch.tensor([[4.0, 1.0, 0.0], [0.5, 2.0, 0.0], [0.0, 0.1, 0.3]])  # each row right, some barely
    assert fit_temperature(logits, torch.tensor([0, 1, 2])) is None  # not T = 0.05, which says "certain"
    line = calibration_line({"temperature": 1.0, "test_ece": 0.1}, calibrated=True)
    assert "the validation split gives no temperature to fit" in line


def test_without_a_validation_split_the_probabilities_are_the_plain_softmax(tiny_data, tmp_path, capsys):
    summary = train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    assert summary["temperature"] == 1.0 and summary["test_ece"] == summary["test_ece_calibrated"]
    assert "probabilities not calibrated" in capsys.readouterr().err
    assert load_model(tmp_path / "run" / "last.pt").temperature == 1.0


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "2", True])
def test_a_model_file_with_an_impossible_temperature_is_one_clear_error(tiny_data, tmp_path, temperature):
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    state = read_model(tmp_path / "run" / "last.pt")
    state["temperature"] = temperature
    with pytest.raises(MiniResNetError, match="its temperature is .*, not a number above 0"):
        model_from_checkpoint(state, "m.pt")


def test_evaluate_on_jpeg_compressed_images(tiny_data, tmp_path, capsys):
    import io

    import numpy as np
    from PIL import Image

    from miniresnet.images import jpeg_roundtrip

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(images[1].permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=50)
    by_hand = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1)
    compressed = jpeg_roundtrip(images, 50, progress=False)
    assert torch.equal(compressed[1], by_hand) and not torch.equal(compressed, images)
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    args = ["evaluate", str(tmp_path / "run" / "last.pt"), "--data-dir", str(tiny_data), "--no-verify-data", "--json"]
    assert main([*args, "--jpeg-quality", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "CIFAR-10 test set, re-encoded as JPEG q50"
    with pytest.raises(SystemExit):
        main([*args, "--jpeg-quality", "0"])
    assert "a JPEG quality is between 1 and 100, got 0" in capsys.readouterr().err


def test_evaluate_on_the_validation_split_a_run_held_out(tiny_data, tmp_path, capsys):
    """`evaluate --val-split N` scores the model on the last N training images, the ones `train
    --val-split N` held out (and fitted its temperature on), and says when the model file records
    another split or none."""
    from miniresnet.evaluate import metrics

    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, epochs=1, val_split=50))
    args = ["evaluate", str(run / "last.pt"), "--data-dir", str(tiny_data), "--no-verify-data", "--json"]
    assert main([*args, "--val-split", "50", "--precision", "fp64"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["source"] == "CIFAR-10 validation split (training images 151-200)"
    assert "note:" not in captured.err
    model, logits, labels = held_out_logits(run / "last.pt", tiny_data)
    expected = metrics(logits, labels, model.classes, model.temperature)
    assert result["n"] == 50 and result["confusion"] == expected["confusion"]
    assert result["accuracy"] == expected["accuracy"]

    assert main([*args, "--val-split", "60"]) == 0
    assert "held out 50 training images, not 60: it trained on 10 of these" in capsys.readouterr().err
    assert main([*args, "--val-split", "40"]) == 0  # within what it held out: nothing to say
    assert "note:" not in capsys.readouterr().err
    export = ["export", str(run / "last.pt"), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]
    assert main([*export, "--data-dir", str(tiny_data), "--no-verify-data"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m.safetensors"), *args[2:], "--val-split", "50"]) == 0
    assert "does not record which images it held out" in capsys.readouterr().err
    # a shipped model's card records its training command: `best` held out nothing, `best-jpeg` 5,000
    assert main(["evaluate", "best", *args[2:], "--val-split", "50"]) == 0
    assert "note: best held out no training images: it trained on these 50" in capsys.readouterr().err
    assert main(["evaluate", "best-jpeg", *args[2:], "--val-split", "50"]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main([*args, "--val-split", "200"]) == 1
    assert "--val-split 200: CIFAR-10 has only 200 training images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--val-split", "50", "--image-folder", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err
