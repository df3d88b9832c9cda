"""The image-folder cache holds only what its key covers: labels follow the class list of the run at
hand (a cache shared by runs with other class lists never mislabels), a re-tagged photo is a
changed file, names need not be UTF-8, linked folders are read, and the directory is trimmed."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from PIL import Image

from conftest import tiny_config
from miniresnet import folders
from miniresnet.cli import main
from miniresnet.folders import load_image_folders, prepared_folder
from miniresnet.train import train

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "ant": (120, 90, 10)}


def write_class(root: Path, name: str, n: int) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 24), COLOURS[name]).save(root / name / f"{i}.png")


def test_a_class_added_to_the_training_folder_never_mislabels_a_cached_test_folder(tmp_path):
    for split, n in (("train", 6), ("test", 3)):
        for name in ("red", "green", "blue"):
            write_class(tmp_path / "f" / split, name, n)
    config = tiny_config(tmp_path / "f", tmp_path / "run1", epochs=1, batch_size=6, dataset="folder")
    first = train(config)
    write_class(tmp_path / "f" / "train", "ant", 6)  # now "ant" is class 0 and every other label moves
    second = train(tiny_config(tmp_path / "f", tmp_path / "run2", epochs=1, batch_size=6, dataset="folder"))
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "miniresnet"
    images, labels, classes = prepared_folder(
        tmp_path / "f" / "test", ("ant", "blue", "green", "red"), 32, cache, False, False
    )
    assert classes == ("ant", "blue", "green", "red")
    # Each test image's label is the class whose colour it has, under the new class list.
    for image, label in zip(images, labels, strict=True):
        assert tuple(image[:, 0, 0].tolist()) == COLOURS[classes[label]]
    assert first["test_acc"] >= 0 and second["test_acc"] >= 0


def test_two_models_with_different_class_lists_evaluate_one_folder_with_its_own_labels(tmp_path):
    for name in ("red", "green"):
        write_class(tmp_path / "test", name, 4)
    cache = tmp_path / "cache"
    for classes in (("green", "red"), ("red", "green"), ("blue", "green", "red")):
        images, labels, _ = prepared_folder(tmp_path / "test", classes, 32, cache, True, False)
        assert [classes[i] for i in labels] == ["green"] * 4 + ["red"] * 4
        assert [tuple(im[:, 0, 0].tolist()) for im in images] == [COLOURS["green"]] * 4 + [COLOURS["red"]] * 4
    assert len(list(cache.glob("folder-*.pt"))) == 1  # one preparation, whatever the class list


def test_a_retagged_photo_is_a_changed_file(tmp_path):
    write_class(tmp_path / "train", "red", 2)
    write_class(tmp_path / "train", "green", 2)
    photo = tmp_path / "train" / "red" / "photo.jpg"
    upright = Image.new("RGB", (60, 30), (220, 20, 20))
    upright.paste((250, 250, 250), (0, 0, 30, 30))  # the left half white: turning it shows
    upright.save(photo, quality=95)
    before = load_image_folders(tmp_path / "train", None, test_fraction=0.3, progress=False)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.save(photo, quality=95, exif=exif)  # the same pixels, now tagged "turn me"
    stat = photo.stat()
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even on a coarse clock
    after = load_image_folders(tmp_path / "train", None, test_fraction=0.3, progress=False)
    assert not torch.equal(
        torch.cat([before.train_images, before.test_images]).sort(0).values,
        torch.cat([after.train_images, after.test_images]).sort(0).values,
    )


def test_links_and_names_that_are_not_utf8_in_a_folder(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    write_class(elsewhere, "blue", 3)
    write_class(tmp_path / "train", "red", 3)
    (tmp_path / "train" / "blue").symlink_to(elsewhere / "blue")  # a linked class folder
    write_class(elsewhere, "green", 2)
    (tmp_path / "train" / "red" / "more").symlink_to(elsewhere / "green")  # a linked folder inside a class
    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), COLOURS["red"]).save(buffer, "PNG")
    (tmp_path / "train" / "red" / os.fsdecode(b"caf\xe9.png")).write_bytes(buffer.getvalue())
    data = load_image_folders(tmp_path / "train", None, test_fraction=0.2, progress=False)
    assert data.classes == ("blue", "red")
    assert torch.bincount(torch.cat([data.train_labels, data.test_labels])).tolist() == [3, 3 + 2 + 1]
    capsys.readouterr()
    train(tiny_config(tmp_path, tmp_path / "run", epochs=1, batch_size=4, dataset="folder"))
    model = tmp_path / "run" / "last.pt"
    assert main(["evaluate", str(model), "--image-folder", str(tmp_path / "train"), "--json"]) == 0


def test_the_cache_directory_keeps_the_recently_used_caches_within_its_size(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    roots = []
    for k in range(3):
        root = tmp_path / f"set{k}"
        write_class(root, "red", 2 + k)
        write_class(root, "green", 2)
        roots.append(root)
    load_image_folders(roots[0], None, cache_dir=cache, progress=False)
    size = next(cache.glob("folder-*.pt")).stat().st_size
    monkeypatch.setattr(folders, "CACHE_BYTES", int(2.5 * size))  # room for two caches of about this size
    load_image_folders(roots[1], None, cache_dir=cache, progress=False)
    first, second = sorted(cache.glob("folder-*.pt"), key=lambda p: p.stat().st_mtime)
    os.utime(first, (first.stat().st_atime, second.stat().st_mtime + 10))  # the first set used last
    load_image_folders(roots[0], None, cache_dir=cache, progress=False)
    assert "from the cache" in capsys.readouterr().err
    load_image_folders(roots[2], None, cache_dir=cache, progress=False)
    assert "removed 1 cache(s) unused for longest" in capsys.readouterr().err
    assert sorted(cache.glob("folder-*.pt")) != [] and second not in cache.glob("folder-*.pt") and first.exists()


def test_a_cache_whose_contents_do_not_fit_the_files_is_rebuilt(tmp_path, capsys):
    write_class(tmp_path / "train", "red", 3)
    write_class(tmp_path / "train", "green", 3)
    load_image_folders(tmp_path / "train", None, cache_dir=tmp_path / "cache", progress=False)
    (path,) = (tmp_path / "cache").glob("folder-*.pt")
    torch.save(
        {"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "kept": torch.tensor([0, 9]), "unreadable": []}, path
    )
    capsys.readouterr()
    data = load_image_folders(tmp_path / "train", None, cache_dir=tmp_path / "cache", progress=False)
    assert "decoded and cached" in capsys.readouterr().err and len(data.train_labels) + len(data.test_labels) == 6
    old_format = {"images": torch.zeros(6, 3, 32, 32, dtype=torch.uint8), "labels": torch.zeros(6), "unreadable": []}
    torch.save(old_format, path)  # version 1 stored labels: never taken
    assert folders.read_cache(path, 6) is None


def test_a_data_dir_of_image_folders_is_found_by_itself(tmp_path, capsys):
    for name in ("red", "green"):
        write_class(tmp_path / "my_data" / "train", name, 5)
        write_class(tmp_path / "my_data" / "test", name, 2)
    args = ["train", "--data-dir", str(tmp_path / "my_data"), "--out", str(tmp_path / "run"), "--epochs", "1"]
    assert main([*args, "--batch-size", "5", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0].endswith(
        "holds image folders (train/<class>/...) and no CIFAR-10: training on them (--dataset folder)"
    )
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == "folder" and config["resolved"]["classes"] == ["green", "red"]
    assert json.loads(out.splitlines()[-1])["epochs"] == 1


def test_a_valid_cache_in_a_read_only_directory_is_used(tmp_path, monkeypatch):
    """Marking a cache used (its mtime, for trimming) fails in a read-only directory; the cache is
    still read. (Simulated: as root, a read-only mode stops nothing.)"""
    for name in ("red", "green"):
        write_class(tmp_path / "f", name, 4)
    cache = tmp_path / "cache"
    first = load_image_folders(tmp_path / "f", None, cache_dir=cache, progress=False)

    def read_only(*_args, **_kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(folders.os, "utime", read_only)
    again = load_image_folders(tmp_path / "f", None, cache_dir=cache, progress=False)
    assert torch.equal(again.train_images, first.train_images)
