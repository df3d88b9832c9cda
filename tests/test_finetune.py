"""Fine-tuning (`--init MODEL`, the `finetune` preset): the initial model's layers are where the run
starts, the last layer is new for other classes, the run records where its weights came from,
everything downstream works on the result, a resume does not read the initial model again, and a
model that cannot be the start is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import interrupt_training_at, script_module, tiny_config
from miniresnet import load_model
from miniresnet.checkpoint import load_checkpoint
from miniresnet.cli import main
from miniresnet.config import PRESETS
from miniresnet.errors import MiniResNetError
from miniresnet.files import hexdigest
from miniresnet.pretrained import shipped_weights
from miniresnet.train import train

COLOURS = {"fox": (200, 90, 20), "owl": (120, 110, 100), "yak": (60, 40, 30)}


def write_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def my_data(tmp_path) -> Path:
    write_folder(tmp_path / "my_data" / "train", 12)
    write_folder(tmp_path / "my_data" / "test", 4, seed=1)
    return tmp_path / "my_data"


def fine_tune(data: Path, out: Path, resume: bool = False, **overrides) -> dict:
    options = dict(dataset="folder", init="seed", epochs=2, batch_size=12, optimizer="sgd", lr=0.05) | overrides
    return train(tiny_config(data, out, **options), resume=resume)


def test_the_layers_come_from_the_initial_model_and_the_last_layer_is_new(my_data, tmp_path):
    summary = fine_tune(my_data, tmp_path / "run", freeze_epochs=2, freeze_norm=True)
    initial = load_model("seed").state_dict()
    tuned = load_checkpoint(tmp_path / "run" / "last.pt")["weights"]
    body = [k for k in initial if not k.startswith("fc.")]
    # Frozen for every epoch, weights and BatchNorm statistics alike: the body is the initial model's, exactly.
    assert all(torch.equal(tuned[k], initial[k]) for k in body)
    assert tuned["fc.weight"].shape == (3, 64) and summary["init"]["kept_last_layer"] is False
    record = {"model": "seed", "sha256": hexdigest(shipped_weights("seed"), "sha256"), "kept_last_layer": False}
    for where in (
        summary["init"],
        json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["init"],
        load_checkpoint(tmp_path / "run" / "last.pt")["init"],
    ):
        assert {k: where[k] for k in record} == record and len(where["classes"]) == 10


def test_unfrozen_the_body_moves_at_its_own_lr(my_data, tmp_path):
    fine_tune(my_data, tmp_path / "slow", body_lr_ratio=0.01, seed=3)
    fine_tune(my_data, tmp_path / "fast", body_lr_ratio=1.0, seed=3)
    initial = load_model("seed").state_dict()
    key = "features.1.conv1.weight"

    def moved(run: str) -> float:
        return (load_checkpoint(tmp_path / run / "last.pt")["weights"][key] - initial[key]).norm().item()

    assert 0 < moved("slow") < moved("fast") / 5


def test_the_same_classes_keep_the_last_layer(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, tmp_path / "run", init="seed", epochs=1, optimizer="sgd", lr=1e-9))
    assert summary["init"]["kept_last_layer"] is True
    initial, tuned = load_model("seed"), load_model(tmp_path / "run" / "last.pt")
    assert torch.allclose(initial.fc.weight, tuned.fc.weight, atol=1e-6)


def test_the_readme_command_and_everything_downstream(my_data, tmp_path, capsys):
    args = ["train", "--dataset", "folder", "--data-dir", str(my_data), "--preset", "finetune", "--init", "best"]
    assert main([*args, "--out", str(tmp_path / "mine"), "--epochs", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["init"]["model"] == "best" and summary["epochs"] == 2
    run = tmp_path / "mine"
    model = run / "last.pt"
    assert main(["predict", str(model), str(my_data / "test" / "fox"), "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 4 and {c["class"] for c in answers[0]["top_k"]} == set(COLOURS)
    assert main(["evaluate", str(model), "--image-folder", str(my_data / "test"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    for fmt, name in (("safetensors", "m.safetensors"), ("onnx", "m.onnx")):
        out = tmp_path / name
        assert main(["export", str(model), "--format", fmt, "--out", str(out), "--image-folder", str(my_data)]) == 0
    capsys.readouterr()
    assert load_model(tmp_path / "m.safetensors").classes == tuple(sorted(COLOURS))
    assert main(["report", str(run)]) == 0 and (run / "report.html").is_file()


def test_a_resumed_fine_tuning_does_not_read_the_initial_model_again(my_data, tmp_path, monkeypatch):
    initial = tmp_path / "initial.safetensors"
    shutil.copy(shipped_weights("seed"), initial)
    whole = fine_tune(my_data, tmp_path / "whole", init=str(initial), epochs=3)
    restore_schedule = interrupt_training_at(monkeypatch, 4)
    with pytest.raises(MiniResNetError, match="--resume"):
        fine_tune(my_data, tmp_path / "broken", init=str(initial), epochs=3)
    restore_schedule()
    initial.unlink()  # gone: a resume that read it again would fail
    resumed = fine_tune(my_data, tmp_path / "broken", resume=True, init=str(initial), epochs=3)
    assert resumed["test_acc"] == whole["test_acc"] and resumed["init"] == whole["init"]
    assert load_checkpoint(tmp_path / "broken" / "last.pt")["init"]["sha256"] == whole["init"]["sha256"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(init="notes.txt"), "is not a model file: it looks like"),
        (dict(image_size=16), r"was trained on 32x32 images and this run prepares 16x16: give --image-size 32"),
        (dict(widths=(8, 16, 32)), r"is a MiniResNet\(16, 32, 64\) .* this run builds MiniResNet\(8, 16, 32\)"),
        (dict(blocks_per_stage=1), "with 2 blocks per stage; this run builds"),
        (dict(init="", freeze_epochs=1), "fine-tune a trained model: give --init MODEL"),
        (dict(init="nonesuch"), "'nonesuch' is neither a file nor a shipped model"),
    ],
)
def test_a_model_that_cannot_be_the_start_is_one_clear_error(my_data, tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text('{"not": "a model"}')
    with pytest.raises(MiniResNetError, match=message):
        fine_tune(my_data, tmp_path / "run", **overrides)


def test_the_finetune_preset_starts_from_best_and_validates():
    preset = PRESETS["finetune"]
    assert preset.init == "best" and (preset.widths, preset.blocks_per_stage) == ((16, 32, 64), 2)
    preset.validate()


def test_the_benchmark_tells_the_preset_as_it_is_from_runs_of_an_earlier_one(tmp_path):
    """benchmarks/finetune.py keys a row by its options and the recipe they resolve to: runs of
    `--preset finetune` recorded before the preset changed are not the preset's runs now."""
    bench = script_module("benchmarks/finetune.py")
    options = bench.final_options("finetune", 100)
    now = bench.recipe_of(options, bench.base_checkpoint(tmp_path, "long"))
    assert now["epochs"] == PRESETS["finetune"].epochs and now["lr"] == PRESETS["finetune"].lr
    row = {"method": "finetune", "n": 100, "options": options, "base": "long", "runs": [{"recipe": now}]}
    assert bench.is_current(row, tmp_path)
    earlier = {**row, "runs": [{"recipe": {**now, "epochs": now["epochs"] + 1}}]}
    assert not bench.is_current(earlier, tmp_path)
    options = bench.final_options("scratch", 100)
    recipe = bench.recipe_of(options, None)
    scratch = {"method": "scratch", "n": 100, "base": None, "options": options, "recipe": recipe}
    assert bench.is_current(scratch, tmp_path)
    assert not bench.is_current({**scratch, "n": 20}, tmp_path)  # the scratch recipe chosen for another size
    unsearched = max(bench.SCRATCH_EPOCHS) + 1
    assert bench.final_options("scratch", unsearched) is None
    assert not bench.is_current({**scratch, "n": unsearched}, tmp_path)
