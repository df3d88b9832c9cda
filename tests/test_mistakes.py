"""Common mistakes get one clear error line and lose nothing: a training run never writes into a
directory that is not its own, exports and plots name the place they cannot write, an export
checks a CIFAR-100 model on CIFAR-100, and a downscale size above the image size is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import export_like, tiny_config
from miniresnet import MiniResNet, data
from miniresnet.cli import main
from miniresnet.errors import MiniResNetError
from miniresnet.train import train
from test_datasets import FINE, write_cifar100


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_of_someone_elses_files_is_never_written_into(tiny_data, tmp_path, overwrite):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.html").write_text("my report")
    (theirs / "last.pt").write_bytes(b"my weights")
    with pytest.raises(MiniResNetError, match="is not empty and holds no run"):
        train(tiny_config(tiny_data, theirs, epochs=1, overwrite=overwrite))
    assert (theirs / "report.html").read_text() == "my report" and (theirs / "last.pt").read_bytes() == b"my weights"
    assert sorted(p.name for p in theirs.iterdir()) == ["last.pt", "report.html"]


def test_out_naming_a_file_is_refused_and_an_empty_directory_is_used(tiny_data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    args = ["train", "--data-dir", str(tiny_data), "--no-download", "--no-verify-data", "--epochs", "1", "--quiet"]
    code, _, err = run_cli(capsys, *args, "--out", str(tmp_path / "a-file"))
    assert code == 1 and err.count("\n") == 1 and "is a file, not a directory" in err
    assert (tmp_path / "a-file").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    code, out, _ = run_cli(capsys, *args, "--batch-size", "25", "--out", str(tmp_path / "empty"))
    assert code == 0 and json.loads(out.splitlines()[-1])["epochs"] == 1


def test_export_into_a_directory_or_an_unwritable_place_is_one_line(tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    export_like(MiniResNet().eval(), model, list(data.CLASSES))
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (40, 40), (10, 200, 30)).save(folder / "a.png")
    check = ["--image-folder", str(tmp_path / "images")]
    code, _, err = run_cli(capsys, "export", str(model), "--format", "safetensors", "--out", str(tmp_path), *check)
    assert code == 1 and err.count("\n") == 1 and "is a directory; name the file to write" in err
    (tmp_path / "blocker").write_text("")
    code, _, err = run_cli(
        capsys, "export", str(model), "--format", "safetensors", "--out", str(tmp_path / "blocker" / "m.st"), *check
    )
    assert code == 1 and err.count("\n") == 1 and "cannot write" in err and "blocker" in err


def test_evaluate_plots_into_a_place_that_cannot_be_written_is_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    model = tmp_path / "m.safetensors"
    export_like(MiniResNet().eval(), model, list(data.CLASSES))
    (tmp_path / "set" / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 200, 30)).save(tmp_path / "set" / "cat" / "a.png")
    (tmp_path / "blocker").write_text("")
    plots = str(tmp_path / "blocker" / "plots")
    code, _, err = run_cli(capsys, "evaluate", str(model), "--image-folder", str(tmp_path / "set"), "--plots", plots)
    assert code == 1 and err == f"miniresnet: error: --plots {plots}: cannot make the folder (Not a directory)\n"


def test_a_cifar100_model_is_exported_with_a_check_on_cifar100(tmp_path, capsys):
    write_cifar100(tmp_path / "c100", data.CIFAR100_PY_DIR, n_train=20, n_test=12)
    model = tmp_path / "c100.safetensors"
    export_like(MiniResNet(num_classes=100).eval(), model, FINE)
    out = tmp_path / "exported.safetensors"
    code, stdout, err = run_cli(
        capsys,
        "export",
        str(model),
        "--format",
        "safetensors",
        "--out",
        str(out),
        "--data-dir",
        str(tmp_path / "c100"),
        "--no-verify-data",
    )
    assert code == 0, err
    assert "checked with load_model on the file on 12 test images" in stdout
    odd = tmp_path / "odd.safetensors"
    export_like(MiniResNet(num_classes=3).eval(), odd, ["a", "b", "c"])
    code, _, err = run_cli(capsys, "export", str(odd), "--format", "onnx", "--out", str(tmp_path / "o.onnx"))
    assert code == 1 and "give --image-folder" in err


def test_a_downscale_size_above_the_image_size_is_refused(tmp_path):
    folder_config = dict(dataset="folder", image_size=16, downscale_epochs=2)
    with pytest.raises(MiniResNetError, match=r"downscale_size must be between 8 and the image size \(16\)"):
        tiny_config(tmp_path, tmp_path / "run", **folder_config).validate()  # the default 24 would upsample
    tiny_config(tmp_path, tmp_path / "run", **folder_config, downscale_size=12).validate()
    tiny_config(tmp_path, tmp_path / "run", dataset="folder", image_size=16).validate()  # no downscaled epochs


def test_a_data_dir_with_neither_cifar_nor_image_folders_says_what_it_expected(tmp_path, monkeypatch):
    def no_network(url, dest, progress):
        raise MiniResNetError(f"could not download {url}: no network")

    monkeypatch.setattr(data, "_fetch", no_network)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("")
    with pytest.raises(MiniResNetError, match=r"holds neither CIFAR-10 \(cifar-10-batches-bin/ or .*nor image folders"):
        data.load_dataset("cifar10", tmp_path / "mine", download=True, progress=False)
    with pytest.raises(MiniResNetError, match="could not download") as empty:  # an empty one: only the network
        data.load_dataset("cifar10", tmp_path / "new", download=True, progress=False)
    assert "holds neither" not in str(empty.value)


@pytest.mark.parametrize("where", ["photo.jpg", "cat/photo.jpg"])
def test_a_folder_of_photos_in_another_layout_gets_no_cifar_download(tmp_path, monkeypatch, where):
    """Photos directly in --data-dir, or in class folders without train/: the user meant their
    images, so CIFAR-10 is not downloaded into their folder (and trained on) instead."""

    def network_used(url, dest, progress):
        raise AssertionError(f"downloaded {url} into {dest}")

    monkeypatch.setattr(data, "_fetch", network_used)
    photo = tmp_path / "photos" / where
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"")
    with pytest.raises(MiniResNetError, match=r"holds image files but neither CIFAR-10 nor image folders laid out"):
        data.load_dataset("cifar10", tmp_path / "photos", download=True, progress=False)


def test_an_unexpected_os_error_is_one_line(tmp_path, capsys, monkeypatch):
    from miniresnet import cli

    def refuse(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(cli, "cmd_models", refuse)
    code, _, err = run_cli(capsys, "models")
    assert code == 1 and err == f"miniresnet: error: {tmp_path / 'x'}: Permission denied\n"


def test_an_empty_directory_is_a_fine_out(tiny_data, tmp_path):
    (tmp_path / "run").mkdir()
    assert train(tiny_config(tiny_data, tmp_path / "run", epochs=1))["epochs"] == 1
    assert Path(tmp_path / "run" / "config.json").is_file()
