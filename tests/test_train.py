import json

import pytest
import torch

from miniresnet.checkpoint import load_checkpoint, load_model
from miniresnet.config import PRESETS, TrainConfig
from miniresnet.errors import MiniResNetError
from miniresnet.train import learning_rate, train


def tiny_config(data_dir, out_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), epochs=3, batch_size=25, lr=3e-3,
                verify_data=False, download=False, quiet=True, eval_batch_size=64)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_seed_preset_is_the_seed_recipe():
    seed = PRESETS["seed"]
    assert (seed.epochs, seed.batch_size, seed.lr, seed.lr_step_epochs, seed.lr_step_factor) == (25, 100, 1e-3, 20, 0.5)
    assert (seed.crop_padding, seed.flip, seed.weight_decay, seed.val_split) == (4, True, 0.0, 0)
    assert (seed.widths, seed.blocks_per_stage) == ((16, 32, 64), 2)


def test_step_schedule_halves_every_20_epochs():
    cfg = PRESETS["seed"]
    assert [learning_rate(cfg, e * 500 + 499, 500) for e in (0, 19, 20, 24, 40)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]


def test_linear_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(schedule="linear", lr=0.4, warmup=0.2, epochs=5)  # 50 steps, 10 of warm-up
    lrs = [learning_rate(cfg, step, 10) for step in range(50)]
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4) == max(lrs)
    diffs = [b - a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert all(d > 0 for d in diffs[:9]) and all(d < 0 for d in diffs[10:])
    assert lrs[-1] == pytest.approx(0.4 / 40) and learning_rate(cfg, 50, 10) == 0


def test_short_run_learns_and_writes_its_run_dir(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(tiny_data, out, epochs=4))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] * 0.7
    assert summary["test_acc"] == metrics[-1]["test_acc"] > 0.3  # final epoch's, well above chance (0.1)
    assert summary["epochs"] == 4 and summary["seconds"] > 0
    for key in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "images_per_sec"):
        assert key in metrics[0]
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 4 and config["resolved"]["params"] == 218_778
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 4
    model = load_model(out / "last.pt")
    assert model.classes[0] == "airplane" and not model.training


def test_validation_split_is_held_out_and_reported(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, tmp_path / "run", epochs=1, val_split=50))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["resolved"]["train_images"] == 150 and config["resolved"]["val_images"] == 50
    assert 0 <= summary["val_acc"] <= 1


def test_same_seed_same_result(tiny_data, tmp_path):
    a = train(tiny_config(tiny_data, tmp_path / "a", epochs=1))
    b = train(tiny_config(tiny_data, tmp_path / "b", epochs=1))
    assert a["test_loss"] == b["test_loss"]
    sa, sb = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_existing_run_dir_is_refused_unless_overwrite(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    with pytest.raises(MiniResNetError, match="already holds a run.*--overwrite"):
        train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1, overwrite=True))


@pytest.mark.parametrize(
    "overrides,message",
    [({"epochs": -1}, "epochs must be at least 1"), ({"batch_size": 0}, "batch_size must be at least 1"),
     ({"lr": 0.0}, "lr must be positive"), ({"batch_size": 500}, "larger than the 200 training images"),
     ({"val_split": 200}, "leaves no training images")],
)  # fmt: skip
def test_invalid_values_are_refused(tiny_data, tmp_path, overrides, message):
    with pytest.raises(MiniResNetError, match=message):
        train(tiny_config(tiny_data, tmp_path / "run", **overrides))


def test_diverging_loss_stops_with_advice(tiny_data, tmp_path):
    with pytest.raises(MiniResNetError, match="loss became nan.*lower --lr"):
        train(tiny_config(tiny_data, tmp_path / "run", epochs=1, lr=1e30))
