"""Data sources other than CIFAR-10: CIFAR-100 (both formats, fine and coarse labels, the download)
and image folders (odd images, the cache, the hold-out split), then a folder trained on and used
end to end with its own class names."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, serve_directory, tiny_config
from miniresnet import load_model
from miniresnet.cli import main
from miniresnet.data import CIFAR100_BIN_DIR, CIFAR100_PY_DIR, RELEASES, download_release, load_cifar100, md5sum
from miniresnet.errors import MiniResNetError
from miniresnet.folders import folder_dataset, load_image_folders, stratified_holdout
from miniresnet.train import train

FINE = [f"fine{i:02d}" for i in range(100)]
COARSE = [f"coarse{i:02d}" for i in range(20)]


def cifar100_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 100, n)
    return rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), fine, fine // 5


def write_cifar100(root: Path, fmt: str, n_train: int = 30, n_test: int = 10) -> Path:
    folder = root / fmt
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, fine, coarse = cifar100_like(n, seed)
        if fmt == CIFAR100_BIN_DIR:
            records = np.concatenate([coarse[:, None], fine[:, None], images.reshape(n, -1)], axis=1)
            (folder / f"{name}.bin").write_bytes(records.astype(np.uint8).tobytes())
        else:
            batch = {b"data": images.reshape(n, -1), b"fine_labels": fine.tolist(), b"coarse_labels": coarse.tolist()}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    if fmt == CIFAR100_BIN_DIR:
        (folder / "fine_label_names.txt").write_text("\n".join(FINE) + "\n")
        (folder / "coarse_label_names.txt").write_text("\n".join(COARSE) + "\n")
    else:
        meta = {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
        (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


@pytest.mark.parametrize("fmt", [CIFAR100_BIN_DIR, CIFAR100_PY_DIR])
@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_both_formats_read_the_same_images_and_labels(tmp_path, fmt, labels):
    data = load_cifar100(write_cifar100(tmp_path, fmt), labels, verify=False)
    images, fine, coarse = cifar100_like(30, 1)
    assert torch.equal(data.train_images, torch.from_numpy(images))
    assert data.train_labels.tolist() == (fine if labels == "fine" else coarse).tolist()
    assert data.classes == tuple(FINE if labels == "fine" else COARSE) and len(data.test_labels) == 10


def test_cifar100_errors_name_the_problem(tmp_path):
    with pytest.raises(MiniResNetError, match="no CIFAR-100 data in .*miniresnet download --dataset cifar100"):
        load_cifar100(tmp_path)
    root = write_cifar100(tmp_path / "a", CIFAR100_PY_DIR)
    with pytest.raises(MiniResNetError, match="train is altered or corrupt: its MD5 is"):
        load_cifar100(root)  # stand-in files do not match the published sums
    root = write_cifar100(tmp_path / "b", CIFAR100_BIN_DIR)
    raw = (root / CIFAR100_BIN_DIR / "train.bin").read_bytes()
    (root / CIFAR100_BIN_DIR / "train.bin").write_bytes(raw[:-7])
    with pytest.raises(MiniResNetError, match="not a whole number of 3,074-byte records"):
        load_cifar100(root, verify=False)


def test_cifar100_download_on_a_small_archive(tmp_path):
    source = write_cifar100(tmp_path / "source", CIFAR100_PY_DIR)
    archive = tmp_path / "www" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / CIFAR100_PY_DIR, arcname=CIFAR100_PY_DIR)
    sums = {p.name: md5sum(p) for p in (source / CIFAR100_PY_DIR).iterdir()}
    release = RELEASES["cifar100"]
    assert release.url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert set(release.file_md5) == set(sums)  # the files the official archive holds
    with serve_directory(archive.parent) as base:
        path = download_release(release, tmp_path / "data", f"{base}/{archive.name}", md5sum(archive), sums, False)
    assert path == tmp_path / "data" / CIFAR100_PY_DIR and not (tmp_path / "data" / archive.name).exists()
    assert load_cifar100(tmp_path / "data", "coarse", verify=False).classes == tuple(COARSE)


# Image folders.

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def coloured(name: str, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[name]) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def make_folder(root: Path, per_class: int = 12, odd: bool = True) -> Path:
    """root/<colour>/*: mixed sizes, formats and modes; with `odd`, a corrupt PNG and a text file too."""
    for c, name in enumerate(COLOURS):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode, suffix = [("RGB", "png"), ("L", "jpg"), ("RGBA", "png"), ("RGB", "bmp"), ("RGB", "webp")][i % 5]
            if mode == "L":
                image = coloured(name, (40 + i, 30), "RGB", seed=i).convert("L")
            else:
                image = coloured(name, (20 + 7 * i, 50 - i), mode, seed=100 * c + i)
            image.save(root / name / f"{i:02d}.{suffix}")
    if odd:
        (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
        (root / "green" / "notes.txt").write_text("not an image")
    return root


def test_a_folder_is_prepared_with_odd_images_listed_and_skipped(tmp_path, capsys):
    data = load_image_folders(make_folder(tmp_path / "train"), None, test_fraction=0.25, progress=False)
    err = capsys.readouterr().err
    assert "1 of 37 files in" in err and "broken.png" in err and "could not be read" in err
    assert "AVIF images by their names: green/notes.txt" in err
    assert data.classes == ("blue", "green", "red")
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == (3, 32, 32)
    assert len(data.train_labels) + len(data.test_labels) == 36
    assert torch.bincount(data.test_labels).tolist() == [3, 3, 3]  # a quarter of each class
    # On average every class kept its colour (greyscale, RGBA, JPEG, BMP and WebP files among them).
    for images, labels in ((data.train_images, data.train_labels), (data.test_images, data.test_labels)):
        for c, name in enumerate(data.classes):
            mean = images[labels == c].float().mean((0, 2, 3))
            assert mean.argmax().item() == np.argmax(COLOURS[name])
    with pytest.raises(MiniResNetError, match="1 of 37 files .* could not be read; fix or remove them: .*broken.png"):
        load_image_folders(tmp_path / "train", None, strict=True, progress=False)


def test_the_cache_is_used_and_rebuilt_when_a_file_changes(tmp_path, capsys):
    root = make_folder(tmp_path / "train", per_class=4, odd=False)
    first = load_image_folders(root, None, progress=False)
    assert "decoded and cached" in capsys.readouterr().err
    again = load_image_folders(root, None, progress=False)
    assert "from the cache" in capsys.readouterr().err and torch.equal(first.train_images, again.train_images)
    coloured("blue", (33, 33), seed=7).save(root / "red" / "00.png")  # changed: a red image turns blue
    changed = load_image_folders(root, None, progress=False)
    assert "decoded and cached" in capsys.readouterr().err
    assert not torch.equal(
        torch.sort(first.train_images.flatten()).values, torch.sort(changed.train_images.flatten()).values
    )
    (root / "red" / "00.png").unlink()  # removed
    fewer = load_image_folders(root, None, progress=False)
    assert "decoded and cached" in capsys.readouterr().err
    assert len(fewer.train_labels) + len(fewer.test_labels) == 11
    for cache in (Path(os.environ["XDG_CACHE_HOME"]) / "miniresnet").glob("folder-*.pt"):
        cache.write_bytes(b"damaged")  # a damaged cache is decoded again, not trusted
    again = load_image_folders(root, None, progress=False)
    assert "decoded and cached" in capsys.readouterr().err and torch.equal(again.train_images, fewer.train_images)


def test_holdout_is_stratified_seeded_and_never_takes_a_whole_class():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    train_idx, test_idx = stratified_holdout(labels, 0.2, seed=3)
    assert torch.bincount(labels[test_idx], minlength=3).tolist() == [2, 1, 0]
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(16))
    assert torch.equal(stratified_holdout(labels, 0.2, seed=3)[1], test_idx)
    assert not torch.equal(stratified_holdout(labels, 0.2, seed=4)[1], test_idx)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda r: (r / "only").mkdir(parents=True), "holds 1 class folder"),
        (lambda r: [(r / "a").mkdir(parents=True), (r / "b").mkdir()], "class folder .*a holds no images"),
        (lambda r: r.mkdir(), "holds no class folders"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, setup, message):
    setup(tmp_path / "train")
    with pytest.raises(MiniResNetError, match=message):
        load_image_folders(tmp_path / "train", None, progress=False)


def test_a_test_folder_with_a_class_the_training_folder_lacks_is_an_error(tmp_path):
    make_folder(tmp_path / "train", per_class=3, odd=False)
    make_folder(tmp_path / "test", per_class=2, odd=False)
    (tmp_path / "test" / "purple").mkdir()
    with pytest.raises(MiniResNetError, match=r"folders \['purple'\] are not among the classes"):
        load_image_folders(tmp_path / "train", tmp_path / "test", progress=False)


def test_a_folders_held_out_test_and_validation_images_are_the_same_at_every_seed(tmp_path):
    """Without a test folder, runs at other seeds are scored on the same held-out images, and none
    trains on images another holds out (a seed-0 model given to a seed-1 run as --init or --teacher
    would otherwise have trained on its test set)."""
    make_folder(tmp_path / "data" / "train", per_class=10, odd=False)
    runs = {}
    for seed in (0, 1):
        cfg = tiny_config(tmp_path / "data", tmp_path / f"s{seed}", epochs=1, batch_size=8, val_split=6, seed=seed)
        train(dataclasses.replace(cfg, dataset="folder"))
        runs[seed] = json.loads((tmp_path / f"s{seed}" / "config.json").read_text())["resolved"]
    assert runs[0]["data_fingerprint"] == runs[1]["data_fingerprint"]  # train and test images, in order


def test_a_folder_trained_on_then_predicted_evaluated_exported_and_reported(tmp_path, capsys):
    make_folder(tmp_path / "data" / "train", per_class=15)
    make_folder(tmp_path / "data" / "test", per_class=5, odd=False)
    summary = train(tiny_config(tmp_path / "data", tmp_path / "run", epochs=1, batch_size=8, dataset="folder"))
    run = tmp_path / "run"
    config_json = json.loads((run / "config.json").read_text())
    assert config_json["resolved"]["classes"] == ["blue", "green", "red"] and summary["epochs"] == 1
    test_eval = json.loads((run / "test_eval.json").read_text())
    assert list(test_eval["per_class"]) == ["blue", "green", "red"] and test_eval["n"] == 15
    model = load_model(run / "last.pt")
    assert model.classes == ("blue", "green", "red") and model.fc.out_features == 3

    assert main(["predict", str(run / "last.pt"), str(tmp_path / "data" / "test" / "red"), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(len(line["top_k"]) == 3 for line in lines)
    assert {c["class"] for c in lines[0]["top_k"]} == {"blue", "green", "red"}

    assert main(["evaluate", str(run / "last.pt"), "--image-folder", str(tmp_path / "data" / "test"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"].keys() == {"blue", "green", "red"}
    two_classes = tmp_path / "two"  # no blue images: blue has no accuracy, not 0%
    shutil.copytree(tmp_path / "data" / "test", two_classes, ignore=shutil.ignore_patterns("blue"))
    assert main(["evaluate", str(run / "last.pt"), "--image-folder", str(two_classes), "--json"]) == 0
    per_class = json.loads(capsys.readouterr().out)["per_class"]
    assert per_class["blue"] is None and 0 <= per_class["red"] <= 1
    assert main(["evaluate", str(run / "last.pt"), "--image-folder", str(two_classes)]) == 0
    assert re.search(r"\nblue +\(none\)\n", capsys.readouterr().out)
    # A CIFAR-10 test set is not this model's data: a clear error, not a confusion of 3 by 10 classes.
    cifar = make_dataset(tmp_path / "cifar")
    assert main(["evaluate", str(run / "last.pt"), "--data-dir", str(cifar), "--no-verify-data"]) == 1
    assert "the model's 3 classes are not CIFAR-10's 10" in capsys.readouterr().err

    out = tmp_path / "m.onnx"
    args = ["export", str(run / "last.pt"), "--format", "onnx", "--out", str(out), "--image-folder"]
    assert main([*args, str(tmp_path / "data" / "test"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == ["blue", "green", "red"]
    onnx = pytest.importorskip("onnx")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == ["blue", "green", "red"] and props["image_size"] == "32"

    assert main(["report", str(run)]) == 0
    assert "green" in (run / "report.html").read_text()
    capsys.readouterr()


def test_folders_named_directly_or_under_the_data_dir(tmp_path):
    make_folder(tmp_path / "anywhere" / "mine", per_class=5, odd=False)
    named = folder_dataset("unused", str(tmp_path / "anywhere" / "mine"), "", test_fraction=0.2, progress=False)
    assert named.classes == ("blue", "green", "red") and torch.bincount(named.test_labels).tolist() == [1, 1, 1]
    with pytest.raises(MiniResNetError, match="no image folder in .*expected .*/train/<class>/<images>"):
        folder_dataset(tmp_path / "anywhere", "", "", progress=False)
    with pytest.raises(MiniResNetError, match="--train-folder and --test-folder need --dataset folder"):
        tiny_config(tmp_path, tmp_path / "run", train_folder="x").validate()


def test_a_cache_that_cannot_be_written_costs_a_decode_not_the_run(tmp_path, capsys):
    root = make_folder(tmp_path / "train", per_class=3, odd=False)
    (tmp_path / "not-a-directory").write_text("")
    data = load_image_folders(root, None, cache_dir=tmp_path / "not-a-directory", progress=False)
    assert len(data.train_labels) + len(data.test_labels) == 9 and "not cached" in capsys.readouterr().err
