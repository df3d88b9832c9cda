import json
import sys

import pytest
import torch

from conftest import gpu_waits, interrupt_training_at, synthetic_images, tiny_config
from miniresnet.checkpoint import load_checkpoint, load_model
from miniresnet.config import PRESETS, SGD_RECIPE, TrainConfig
from miniresnet.errors import MiniResNetError
from miniresnet.model import whiten_stem
from miniresnet.rundir import TrainingInterrupted
from miniresnet.train import learning_rate, train


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
    assert summary["epochs"] == 4 == summary["epoch_equivalents"] and summary["seconds"] > 0
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
    assert all(torch.equal(sa["weights"][k], sb["weights"][k]) for k in sa["weights"])


def test_whitened_stem_starts_from_the_normalised_training_images(tiny_data, tmp_path, monkeypatch):
    import miniresnet.train as train_module

    seen = []

    def spy(model, images):
        seen.append(images)
        whiten_stem(model, images)

    monkeypatch.setattr(train_module, "whiten_stem", spy)
    summary = train(tiny_config(tiny_data, tmp_path / "run", epochs=2, stem_init="whitened", alternate_flip=True))
    (images,) = seen
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-3  # normalised with the training set's statistics
    assert summary["test_acc"] > 0.2


def test_existing_run_dir_is_refused_unless_overwrite(tiny_data, tmp_path):
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    with pytest.raises(MiniResNetError, match="already holds a run.*--overwrite"):
        train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1, overwrite=True))


def test_overwrite_keeps_the_earlier_run_until_the_new_one_can_start(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(tiny_data, run, epochs=2, val_split=40))
    (run / "tensorboard").mkdir()  # as --tensorboard leaves it
    before = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json")}
    with pytest.raises(MiniResNetError):  # no data there: the new run cannot start
        train(tiny_config(tmp_path / "no-data", run, epochs=1, overwrite=True))
    assert {name: (run / name).read_bytes() for name in before} == before
    with pytest.raises(MiniResNetError):  # nor does a fresh run that cannot start leave an empty directory
        train(tiny_config(tmp_path / "no-data", tmp_path / "never", epochs=1))
    assert not (tmp_path / "never").exists()
    train(tiny_config(tiny_data, run, epochs=1, overwrite=True))  # no validation split: no best.pt of its own
    assert not (run / "best.pt").exists() and not (run / "tensorboard").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"epochs": -1}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"batch_size": 500}, "larger than the 200 training images"),
        ({"val_split": 200}, "leaves no training images"),
        # what a hand-edited config.json or a TrainConfig built in Python can hold: the parser checks nothing there
        ({"flip": "false"}, "flip must be true or false, got 'false'"),
        ({"optimizer": "adamw"}, "optimizer must be one of adam, sgd, muon, got 'adamw'"),
        ({"epochs": "30"}, "epochs must be a whole number, got '30'"),
        ({"lr": float("inf")}, "lr must be a finite number, got inf"),
        ({"weight_decay": float("nan")}, "weight_decay must be a finite number, got nan"),
        ({"tta": "flips"}, "tta must be one of none, flip, flip-translate"),
        ({"lr_step_factor": -0.5}, "lr_step_factor must be positive"),
        ({"warmup": 0.1}, "warmup belongs to the linear schedule"),
        ({"labels": "coarse"}, "it needs --dataset cifar100"),
        ({"alternate_flip": True, "flip": False}, "it needs flipping on"),
        ({"blocks_per_stage": 17}, "blocks_per_stage must be at most 16"),
        ({"widths": (16, 32, 2048)}, "widths must be 1 to 8 stages of at most 1024 channels"),
        ({"seed": 2**40}, "seed must be between 0 and 2"),
        ({"optimizer": "muon", "init": "best", "freeze_norm": True}, "muon holds each filter bank at a fixed norm"),
    ],
)
def test_invalid_values_are_refused(tiny_data, tmp_path, overrides, message):
    with pytest.raises(MiniResNetError, match=message):
        train(tiny_config(tiny_data, tmp_path / "run", **overrides))


def test_diverging_loss_stops_with_advice(tiny_data, tmp_path):
    advice = r"Lower --lr or add a warm-up \(--schedule linear --warmup 0.1\)"  # the seed recipe's schedule is step
    with pytest.raises(MiniResNetError, match=r"loss became nan at step \d+ of epoch 1 .*" + advice):
        train(tiny_config(tiny_data, tmp_path / "run", epochs=1, lr=1e30))


def test_training_steps_wait_for_the_device_only_when_the_tally_is_read():
    """On a GPU every read-back of a number (`.item()`, `int(tensor)`) waits for the queue of
    kernels to drain; the steps read back only every READ_EVERY steps and at the epoch's end.
    Counted on the CPU through aten::_local_scalar_dense, the op behind every such read (the code
    before the device-side tally did two per step: the loss and the correct count)."""
    from torch.profiler import profile

    from miniresnet.loader import BatchLoader
    from miniresnet.model import MiniResNet
    from miniresnet.runtime import FP32
    from miniresnet.train import READ_EVERY, build_optimizer, train_steps

    images, labels = synthetic_images(160)
    steps = 160 // 4
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    data = torch.from_numpy(images), torch.from_numpy(labels).long()
    loader = BatchLoader(*data, 4, mean, std, shuffle=True, crop_padding=4, flip=True, cutout=8)
    model = MiniResNet((4, 8, 8), 1)
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.01))
    with profile() as profiler:
        tallies = [t.step for t in train_steps(model, optimizer, loader, lambda step: 0.01, 0, precision=FP32)]
    reads = sum(e.count for e in profiler.key_averages() if e.key == "aten::_local_scalar_dense")
    assert tallies == list(range(1, steps + 1))
    assert reads == 3 * (steps // READ_EVERY)  # the loss sum, the correct count, the first non-finite step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_steps_wait_for_the_gpu_only_when_the_tally_is_read(precision):
    """The GPU's view of the test above: CUDA's sync debug mode warns at every operation that makes
    the host wait for the GPU (read-backs, copies from pageable memory). After the epoch's first
    step (which moves its random draws and the tally's sums to the GPU), only the reads wait."""
    from miniresnet.loader import BatchLoader
    from miniresnet.model import MiniResNet
    from miniresnet.runtime import resolve_precision
    from miniresnet.train import READ_EVERY, build_optimizer, train_steps

    cuda = torch.device("cuda")
    images, labels = synthetic_images(160)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    data = torch.from_numpy(images), torch.from_numpy(labels).long()
    loader = BatchLoader(*data, 4, mean, std, shuffle=True, crop_padding=4, flip=True, cutout=8, device=cuda)
    model = MiniResNet((4, 8, 8), 1).to(cuda)
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.01))
    resolved = resolve_precision(precision, cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=resolved.name == "fp16")
    steps = train_steps(model, optimizer, loader, lambda step: 0.01, 0, precision=resolved, scaler=scaler)
    next(steps)
    taken, waits = gpu_waits(steps)
    assert 1 + taken == len(loader)
    assert len(waits) <= 3 * (len(loader) // READ_EVERY), waits


@pytest.mark.parametrize("init_scale,taken", [(2.0**100, False), (2.0**10, True)])
def test_fp16_steps_scale_the_loss_and_skip_a_step_whose_gradients_overflowed(init_scale, taken):
    """fp16 (on CUDA) trains through a GradScaler: the loss is scaled so that small gradients do not
    underflow, and a step whose scaled gradients overflowed is skipped and the scale halved. Run
    here with the CPU's fp16 autocast, which computes the same way."""
    from miniresnet.loader import BatchLoader
    from miniresnet.model import MiniResNet
    from miniresnet.runtime import Precision
    from miniresnet.train import build_optimizer, train_steps

    images, labels = synthetic_images(40)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    loader = BatchLoader(torch.from_numpy(images), torch.from_numpy(labels).long(), 20, mean, std, shuffle=True)
    model = MiniResNet((4, 8, 8), 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    fp16 = Precision("fp16", torch.float16)
    next(iter(train_steps(model, optimizer, loader, lambda step: 0.1, 0, precision=fp16, scaler=scaler)))
    changed = not torch.equal(model.fc.weight, before["fc.weight"])
    assert changed == taken
    assert scaler.get_scale() == (init_scale if taken else init_scale / 2)


def test_checkpoint_carries_the_fp16_loss_scale():
    from miniresnet.checkpoint import restore_training, training_checkpoint
    from miniresnet.model import MiniResNet
    from miniresnet.train import build_optimizer

    model = MiniResNet((4, 8, 8), 1)
    optimizer = build_optimizer(model, TrainConfig())
    facts = dict(epoch=1, tally={}, history=[], best_val=-1.0, seconds=1.0, classes=("a",), image_size=32)
    facts |= dict(
        mean=torch.zeros(3), std=torch.ones(3), data_fingerprint="0" * 64, config={}, device=torch.device("cpu")
    )

    state = training_checkpoint(model, optimizer, None, torch.amp.GradScaler("cpu", init_scale=256.0), **facts)
    restored = torch.amp.GradScaler("cpu", init_scale=1024.0)
    restore_training(state, model, optimizer, None, restored, torch.device("cpu"))
    assert restored.get_scale() == 256.0
    unscaled = training_checkpoint(model, optimizer, None, torch.amp.GradScaler("cpu", enabled=False), **facts)
    assert unscaled["scaler"] is None


def comparable(metrics: list[dict]) -> list[dict]:
    """Metrics without the wall-clock fields, which differ from run to run."""
    return [{k: v for k, v in m.items() if k not in ("seconds", "elapsed", "images_per_sec")} for m in metrics]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Steps 5, 8 and 13 are mid-epoch 1, the end of epoch 1 and mid-epoch 2 (160 / 20 = 8 steps per
# epoch); with Lookahead every 3 steps, 13 is also between two of its syncs.
@pytest.mark.parametrize("stop_at_step,lookahead", [(5, 0), (8, 0), (13, 0), (13, 3)])
def test_interrupted_and_resumed_run_is_bit_identical(tiny_data, tmp_path, monkeypatch, stop_at_step, lookahead):
    import signal

    recipe = dict(
        epochs=3,
        batch_size=20,
        optimizer="sgd",
        lr=0.05,
        schedule="linear",
        warmup=0.2,
        label_smoothing=0.1,
        ema=0.9,
        weight_decay=5e-4,
        decay_norm_and_bias=False,
        val_split=40,
        tta="flip",
        lookahead=lookahead,
    )
    whole = train(tiny_config(tiny_data, tmp_path / "whole", **recipe))

    broken_dir = tmp_path / "broken"
    restore_schedule = interrupt_training_at(monkeypatch, stop_at_step - 1)  # lands while that step runs
    with pytest.raises(TrainingInterrupted, match="--resume") as stopped:
        train(tiny_config(tiny_data, broken_dir, **recipe))
    assert stopped.value.exit_code == 128 + signal.SIGINT
    saved = load_checkpoint(broken_dir / "last.pt")
    assert saved["epoch"] * 8 + saved["tally"]["step"] == stop_at_step
    restore_schedule()

    resumed = train(tiny_config(tiny_data, broken_dir, **recipe), resume=True)
    assert comparable(read_metrics(broken_dir)) == comparable(read_metrics(tmp_path / "whole"))
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "run_dir", "checkpoint", "best_checkpoint")} == {
        k: v for k, v in whole.items() if k not in ("seconds", "run_dir", "checkpoint", "best_checkpoint")
    }
    a, b = load_checkpoint(tmp_path / "whole" / "last.pt"), load_checkpoint(broken_dir / "last.pt")
    for key in ("weights", "trained_weights"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # raised inside torch.compile itself
def test_compiled_training_computes_what_eager_training_does(tiny_data, tmp_path, monkeypatch):
    """--compile changes how the steps run, not what they compute; checkpoints hold the plain model.
    In float64, where the compiled kernels' other order of summation changes nothing measurable
    (in float32 it changes the last bits on some CPUs, and training amplifies them)."""
    # A cache of its own: inductor's cache key leaves out ATEN_CPU_CAPABILITY, and kernels compiled
    # without an ISA cap, reused under one, compute wrong results (seen: a loss off by 5%).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    train(tiny_config(tiny_data, tmp_path / "eager", epochs=1, precision="fp64"))
    train(tiny_config(tiny_data, tmp_path / "compiled", epochs=1, precision="fp64", compile=True))
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert compiled[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-9)
    assert compiled[0]["test_loss"] == pytest.approx(eager[0]["test_loss"], rel=1e-6)  # from float32 logits
    assert not any("_orig_mod" in key for key in load_checkpoint(tmp_path / "compiled" / "last.pt")["weights"])


def test_checkpoint_every_n_steps_and_best_on_validation(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, epochs=2, checkpoint_every=3, val_split=40))
    metrics = read_metrics(out)
    best = load_checkpoint(out / "best.pt")
    best_epoch = max(metrics, key=lambda m: m["val_acc"])["epoch"]
    assert best["epoch"] == best_epoch and best["best_val"] == max(m["val_acc"] for m in metrics)
    assert load_checkpoint(out / "last.pt")["tally"]["step"] == 0  # the epoch-end save comes last


def test_resume_needs_a_run_and_a_fresh_run_refuses_an_old_one(tiny_data, tmp_path):
    with pytest.raises(MiniResNetError, match="no run to resume"):
        train(tiny_config(tiny_data, tmp_path / "nothing"), resume=True)
    train(tiny_config(tiny_data, tmp_path / "run", epochs=1))
    with pytest.raises(MiniResNetError, match="--resume"):
        train(tiny_config(tiny_data, tmp_path / "run", epochs=1))


def test_run_killed_after_its_last_checkpoint_resumes_to_write_its_results(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, epochs=2, tta="flip")
    summary = train(cfg)
    test_eval = json.loads((out / "test_eval.json").read_text())
    for written_after_the_checkpoint in ("summary.json", "test_eval.json", "curves.png"):
        (out / written_after_the_checkpoint).unlink(missing_ok=True)
    resumed = train(cfg, resume=True)
    assert (resumed["test_acc"], resumed["test_acc_plain"]) == (summary["test_acc"], summary["test_acc_plain"])
    assert json.loads((out / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    assert json.loads((out / "test_eval.json").read_text()) == test_eval
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    with pytest.raises(MiniResNetError, match="already finished"):  # once its summary is there, it is done
        train(cfg, resume=True)


def test_tensorboard_scalars_match_metrics(tiny_data, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install 'miniresnet[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, epochs=2, tensorboard=True))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    metrics = read_metrics(out)
    logged = [(e.step, e.value) for e in events.Scalars("test/acc")]
    assert logged == [(m["epoch"], pytest.approx(m["test_acc"])) for m in metrics]
    assert {"train/loss", "train/acc", "test/loss", "lr"} <= set(events.Tags()["scalars"])


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    import miniresnet.loss as loss_module

    real_cross_entropy, calls = loss_module.F.cross_entropy, []

    def loss_that_blows_up(*args, **kwargs):
        loss = real_cross_entropy(*args, **kwargs)
        if "label_smoothing" not in kwargs:  # an evaluation, not a training step
            return loss
        calls.append(1)
        return loss * float("nan") if len(calls) == 11 else loss  # step 3 of epoch 2 (8 steps per epoch)

    monkeypatch.setattr(loss_module.F, "cross_entropy", loss_that_blows_up)
    out = tmp_path / "run"
    with pytest.raises(MiniResNetError, match=r"nan at step 3 of epoch 2 .*last good checkpoint is .*last.pt"):
        train(tiny_config(tiny_data, out, epochs=3))
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert len(read_metrics(out)) == 1


def test_without_matplotlib_runs_and_reports_say_how_to_get_plots(tiny_data, tmp_path, monkeypatch, capsys):
    from miniresnet.report import write_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as where it is missing
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, epochs=1))
    assert "pip install 'miniresnet[plots]'" in capsys.readouterr().err
    assert not list(out.glob("*.png"))
    page = write_report(out).read_text()
    assert "pip install &#x27;miniresnet[plots]&#x27;" in page and "<img" not in page


def test_every_preset_trains_the_unchanged_architecture():
    for name, cfg in PRESETS.items():
        assert (cfg.widths, cfg.blocks_per_stage) == ((16, 32, 64), 2), name
        cfg.validate()
    recipe = SGD_RECIPE.to_dict()

    def changes(name):
        preset = PRESETS[name].to_dict()
        return {k: preset[k] for k in preset if preset[k] != recipe[k]}

    # best is the SGD recipe run long, plus the regularisation a long run needs: nothing else differs.
    assert set(changes("best")) == {"epochs", "warmup", "downscale_epochs", "eval_every", "cutout"}
    # quick and fast are the same short recipe at two lengths.
    short = {"optimizer": "muon", "crop_padding": 2, "downscale_size": 16}
    assert PRESETS["quick"].muon_lr == PRESETS["fast"].muon_lr == 0.05
    assert changes("quick") == short | {"epochs": 7, "downscale_epochs": 4}
    assert changes("fast") == short | {"epochs": 14, "downscale_epochs": 8}


def test_compute_in_full_resolution_epoch_equivalents():
    assert PRESETS["seed"].epoch_equivalents() == 25
    assert PRESETS["quick"].epoch_equivalents() == 4
    assert PRESETS["fast"].epoch_equivalents() == 8
    assert PRESETS["best"].epoch_equivalents() == 100 * 0.5625 + 100
    assert TrainConfig(epochs=3, downscale_epochs=5, downscale_size=16).epoch_equivalents() == 0.75
