"""A resumed run continues on the data it was trained on, or stops before restoring anything with one
error line that says what differs; and --resume continues the run where it is."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, synthetic_images, tiny_config, write_binary_batch
from miniresnet.checkpoint import load_checkpoint, save_checkpoint
from miniresnet.cli import build_parser, config_from_args, main
from miniresnet.config import TrainConfig
from miniresnet.data import BIN_DIR, TRAIN_FILES
from miniresnet.errors import MiniResNetError
from miniresnet.train import train


def finished_but_for_its_results(cfg: TrainConfig) -> Path:
    """Train `cfg` and remove its summary, as if killed after its last checkpoint: a resume then only
    checks the data, re-evaluates and writes the results (the cheapest resume there is)."""
    train(cfg)
    (Path(cfg.out_dir) / "summary.json").unlink()
    return Path(cfg.out_dir)


def image_folder(root: Path, classes: list[str], per_class: int = 6) -> Path:
    """root/train/<class>/*.png: 32x32 images, one colour per class."""
    rng = np.random.default_rng(len(classes))
    for c, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(40 * c + 30 + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    return root


def test_resume_on_other_classes_is_one_error_line_not_a_size_mismatch(tmp_path, capsys):
    old, new = image_folder(tmp_path / "old", ["cat", "dog"]), image_folder(tmp_path / "new", ["ant", "bee", "cow"])
    run = finished_but_for_its_results(
        tiny_config(old, tmp_path / "run", dataset="folder", epochs=1, batch_size=4, test_fraction=0.25)
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data-dir", str(new), "--quiet", "--threads", "1"]) == 1
    err = capsys.readouterr().err  # the new folder's "decoded and cached" line, then the error
    assert err.endswith(
        f"\nminiresnet: error: the run in {run} was trained on image folder {old / 'train'} with classes [cat, dog]; "
        f"image folder {new / 'train'} gives classes [ant, bee, cow]: resume with the same data, or start a new run\n"
    )
    assert "Traceback" not in err and err.count("error") == 1
    assert not (run / "summary.json").exists()


def test_resume_on_other_images_with_the_same_classes_is_refused(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1)
    run = finished_but_for_its_results(cfg)
    other = make_dataset(tmp_path / "other", per_file=30)
    with pytest.raises(MiniResNetError) as refused:
        train(dataclasses.replace(cfg, data_dir=str(other)), resume=True)
    message = str(refused.value)
    assert message.startswith(f"the run in {run} was trained on cifar10 in {tiny_data} with mean [0.")
    assert f"; cifar10 in {other} gives mean [0." in message
    assert message.endswith(": resume with the same data, or start a new run")


def test_resume_checks_every_image_and_label_not_only_the_statistics(tiny_data, tmp_path):
    """The same images with other labels have the same classes, mean and std: only the data's
    SHA-256 (in the checkpoint and config.json) tells them apart. The same files elsewhere resume."""
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1)
    run = finished_but_for_its_results(cfg)
    fingerprint = load_checkpoint(run / "last.pt")["data_fingerprint"]
    assert json.loads((run / "config.json").read_text())["resolved"]["data_fingerprint"] == fingerprint

    relabelled = tmp_path / "relabelled"
    shutil.copytree(tiny_data, relabelled)
    images, labels = synthetic_images(40, seed=0)  # what make_dataset wrote to the first training file
    write_binary_batch(relabelled / BIN_DIR / TRAIN_FILES[BIN_DIR][0], images, (labels + 1) % 10)
    with pytest.raises(MiniResNetError, match=rf"with images and labels of SHA-256 {fingerprint}; .* gives images"):
        train(dataclasses.replace(cfg, data_dir=str(relabelled)), resume=True)

    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    summary = train(dataclasses.replace(cfg, data_dir=str(moved)), resume=True)
    assert summary["epochs"] == 1 and (run / "summary.json").exists()


def test_a_checkpoint_from_before_fingerprints_is_checked_on_what_it_holds(tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1)
    run = finished_but_for_its_results(cfg)
    state = load_checkpoint(run / "last.pt")
    del state["data_fingerprint"]
    save_checkpoint(state, run / "last.pt")
    other = make_dataset(tmp_path / "other", per_file=30)
    with pytest.raises(MiniResNetError, match=r"with mean \[.*\] and std \[.*\]; cifar10 in .* gives mean"):
        train(dataclasses.replace(cfg, data_dir=str(other)), resume=True)

    capsys.readouterr()
    train(cfg, resume=True)
    assert "predates data fingerprints" in capsys.readouterr().err
    assert torch.equal(load_checkpoint(run / "last.pt")["weights"]["fc.weight"], state["weights"]["fc.weight"])


def test_resume_keeps_the_run_where_it_is(tmp_path, capsys):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(tiny_config(tmp_path / "data", run).to_dict()))
    assert main(["train", "--resume", str(run), "--out", str(elsewhere)]) == 1
    assert capsys.readouterr().err == (
        f"miniresnet: error: --resume continues the run in {run} where it is; drop --out {elsewhere}\n"
    )
    args = build_parser().parse_args(["train", "--resume", str(run), "--out", f"{tmp_path}/./run/", "--threads", "1"])
    cfg = config_from_args(args)
    assert (cfg.out_dir, cfg.threads) == (str(run), 1)


def test_a_resume_with_another_recipe_is_refused_naming_what_changed(tiny_data, tmp_path, capsys):
    """Its config.json edited, or train() given another config: the run would go on as neither run."""
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=2)
    run = finished_but_for_its_results(cfg)
    with pytest.raises(MiniResNetError, match=r"started with another recipe \(lr 0.003 -> 0.01\): resume it as it"):
        train(dataclasses.replace(cfg, lr=0.01), resume=True)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "epochs": 5, "seed": 3}))
    assert main(["train", "--resume", str(run)]) == 1
    assert "another recipe (epochs 2 -> 5, seed 0 -> 3)" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps(config))
    train(dataclasses.replace(cfg, threads=1, quiet=False), resume=True)  # how the work is done may change


def test_a_resume_in_another_precision_says_so(tiny_data, tmp_path, capsys):
    cfg = tiny_config(tiny_data, tmp_path / "run", epochs=1, quiet=False)
    run = finished_but_for_its_results(cfg)
    config = json.loads((run / "config.json").read_text())
    config["resolved"]["precision"] = "fp16"  # as if it started on a GPU
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    train(cfg, resume=True)
    assert "started in fp16 with 1 process(es) and continues in" in capsys.readouterr().err
