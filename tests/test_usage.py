"""After training: predict on image files, evaluate on image folders, plots, the HTML report and
export, as a user runs them (through the CLI's main, in process)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, synthetic_images, tiny_config
from miniresnet import MiniResNet, load_model
from miniresnet.augment import normalize
from miniresnet.cli import main
from miniresnet.data import CLASSES
from miniresnet.images import load_image
from miniresnet.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data dir, run dir) of a short run on tiny synthetic data."""
    root = tmp_path_factory.mktemp("usage")
    data = make_dataset(root / "data")
    train(tiny_config(data, root / "run", epochs=2, tta="flip"))
    return data, root / "run"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def is_png(path: Path, min_side: int = 200) -> bool:
    """A valid PNG (signature, IHDR, intact IDAT data) of at least min_side pixels each way."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", raw[16:24])
    with Image.open(path) as image:
        image.load()  # decodes every chunk: fails on a truncated or corrupt file
    return width >= min_side and height >= min_side


def save_images(folder: Path, images: np.ndarray, fmt: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i}.{fmt}"
        Image.fromarray(image.transpose(1, 2, 0)).save(path)
        paths.append(path)
    return paths


def test_training_writes_curves_confusion_and_mistakes(trained):
    _, run = trained
    for name in ("curves.png", "confusion.png", "misclassified.png"):
        assert is_png(run / name), name
    test_eval = json.loads((run / "test_eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert test_eval["accuracy"] == summary["test_acc"] and test_eval["tta"] == "flip"


def test_report_shows_the_runs_figures_and_plots(trained, capsys):
    _, run = trained
    code, out, _ = run_cli(capsys, "report", str(run))
    assert code == 0 and "report.html" in out
    page = (run / "report.html").read_text()
    for name in ("curves.png", "confusion.png", "misclassified.png"):
        assert f'src="{name}"' in page
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in metrics:
        assert f"<td>{record['train_loss']:.4f}</td>" in page and f"<td>{record['test_acc']:.4f}</td>" in page
    assert page.count("<tr>") > len(metrics) + len(CLASSES)


def test_report_of_a_directory_that_is_no_run(tmp_path, capsys):
    code, _, err = run_cli(capsys, "report", str(tmp_path))
    assert code == 1 and "not a training run directory: config.json is missing" in err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("config.json", "[]", "config.json is not a run's JSON: an object was expected, not list"),
        ("test_eval.json", '{"accuracy": 0.', "test_eval.json is not a run's JSON (Expecting"),
        ("metrics.jsonl", '{"epoch": 1}\n7\n', "metrics.jsonl is not a run's JSON: an object was expected, not int"),
        ("summary.json", b"\xff\xfe{}", "summary.json is not a run's JSON ('utf-8' codec can't decode"),
    ],
)
def test_report_of_a_run_with_a_damaged_file_is_one_line(trained, tmp_path, capsys, name, content, message):
    run = tmp_path / "run"
    shutil.copytree(trained[1], run)
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = run_cli(capsys, "report", str(run))
    assert code == 1 and message in err and "Traceback" not in err


def test_class_names_in_any_script_and_with_dollars_reach_the_plots_and_the_page(tmp_path):
    """report.html is UTF-8 whatever the locale (LC_ALL=C here); a $ in a class name is no math."""
    script = (
        "import sys; from pathlib import Path; from miniresnet.files import write_text_atomically; "
        "from miniresnet.plots import plot_confusion; "
        "plot_confusion([[1, 0], [0, 1]], ('$\\\\frac$', 'US$ and HK$'), Path(sys.argv[1]) / 'c.png'); "
        "write_text_atomically(Path(sys.argv[1]) / 'p.html', 'caf\\u00e9 \\u732b')"  # escaped: an ASCII command line
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.html").read_text(encoding="utf-8") == "café 猫" and is_png(tmp_path / "c.png")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "RGB", "CMYK", "I;16"])
def test_any_image_mode_and_size_becomes_32x32_rgb(tmp_path, mode):
    image = Image.new("RGB", (97, 61), (200, 30, 30)).convert(mode)
    path = tmp_path / f"image.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    tensor = load_image(path)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png") == 255).all()


def test_predict_prints_top_k_and_reports_bad_files_without_stopping(trained, tmp_path, capsys):
    _, run = trained
    images, _ = synthetic_images(3, seed=7)
    paths = save_images(tmp_path / "in", images, "png")
    Image.fromarray(images[0].transpose(1, 2, 0)).resize((300, 200)).save(tmp_path / "in" / "big.jpg")
    Image.fromarray(images[1].transpose(1, 2, 0)).save(tmp_path / "in" / "x.webp")
    Image.fromarray(images[2].transpose(1, 2, 0)).save(tmp_path / "in" / "y.bmp")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, out, err = run_cli(capsys, "predict", str(run / "last.pt"), str(tmp_path / "in"), "--top-k", "2", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and len(lines) == 7
    good = [line for line in lines if "top_k" in line]
    assert len(good) == 6 and all(len(line["top_k"]) == 2 for line in good)
    assert all(line["top_k"][0]["probability"] >= line["top_k"][1]["probability"] for line in good)
    assert all(line["top_k"][0]["class"] in CLASSES for line in good)
    (bad,) = [line for line in lines if "error" in line]
    assert bad["file"].endswith("broken.png") and "not a readable image" in bad["error"]
    assert "1 of 7 files could not be read" in err

    code, out, _ = run_cli(capsys, "predict", str(run / "last.pt"), str(paths[0]), "--tta", "flip")
    assert code == 0 and out.startswith(str(paths[0])) and "%" in out


def test_predict_agrees_with_the_model_on_the_same_pixels(trained, tmp_path, capsys):
    _, run = trained
    images, _ = synthetic_images(4, seed=11)
    paths = save_images(tmp_path / "in", images)  # PNG is lossless: the same pixels come back
    _, out, _ = run_cli(
        capsys, "predict", str(run / "last.pt"), *map(str, paths), "--top-k", "1", "--json", "--precision", "fp64"
    )
    model = load_model(run / "last.pt").double()  # float64 on both sides: the same figures on any CPU
    pixels = torch.from_numpy(images).double() / 255
    expected = model((pixels - model.mean.view(1, 3, 1, 1)) / model.std.view(1, 3, 1, 1)).softmax(1)
    for line, probs in zip(out.splitlines(), expected, strict=True):
        top = json.loads(line)["top_k"][0]
        assert top["class"] == CLASSES[probs.argmax()]
        assert top["probability"] == pytest.approx(probs.max().item(), abs=1e-6)  # printed to 6 decimals


def test_evaluate_on_an_image_folder_matches_the_same_images_as_tensors(trained, tmp_path, capsys):
    _, run = trained
    images, labels = synthetic_images(30, seed=5)
    for cls in range(10):
        save_images(tmp_path / "folder" / CLASSES[cls], images[labels == cls])
    code, out, _ = run_cli(
        capsys,
        "evaluate",
        str(run / "last.pt"),
        "--image-folder",
        str(tmp_path / "folder"),
        "--json",
        "--plots",
        str(tmp_path / "plots"),
        "--precision",
        "fp64",
    )
    result = json.loads(out)
    assert code == 0 and result["n"] == 30 and sum(map(sum, result["confusion"])) == 30
    model = load_model(run / "last.pt").double()  # float64 on both sides: no near-tie flips between kernels
    pixels = torch.from_numpy(images).double() / 255
    x = (pixels - model.mean.view(1, 3, 1, 1)) / model.std.view(1, 3, 1, 1)
    expected = (model(x).argmax(1) == torch.from_numpy(labels).long()).float().mean().item()
    assert result["accuracy"] == pytest.approx(expected)
    assert is_png(tmp_path / "plots" / "confusion.png") and is_png(tmp_path / "plots" / "misclassified.png", 100)


def test_image_folder_errors_name_the_problem(trained, tmp_path, capsys):
    _, run = trained
    (tmp_path / "f" / "airplane").mkdir(parents=True)
    (tmp_path / "f" / "aeroplane").mkdir()
    code, _, err = run_cli(capsys, "evaluate", str(run / "last.pt"), "--image-folder", str(tmp_path / "f"))
    assert code == 1 and "['aeroplane'] are not among the classes" in err
    (tmp_path / "f" / "aeroplane").rmdir()
    code, _, err = run_cli(capsys, "evaluate", str(run / "last.pt"), "--image-folder", str(tmp_path / "f"))
    assert code == 1 and "holds no images" in err


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors", "onnx"])
def test_export_is_checked_against_pytorch(trained, tmp_path, capsys, fmt):
    data, run = trained
    out = tmp_path / f"model.{fmt}"
    code, stdout, _ = run_cli(
        capsys,
        "export",
        str(run / "last.pt"),
        "--format",
        fmt,
        "--out",
        str(out),
        "--data-dir",
        str(data),
        "--no-verify-data",
        "--json",
    )
    result = json.loads(stdout)
    assert code == 0 and out.is_file() and result["checked_on_images"] == 100
    assert result["max_abs_logit_diff"] < 1e-3 and result["top1_agreement"] == 1.0
    assert not list(tmp_path.glob(".*.tmp*"))  # the temporary file was renamed into place, nothing beside it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("model")] == [out.name]  # one file
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes, not a temp file's 0600
    # It stands alone: moved by itself to another directory, it runs there and gives PyTorch's logits.
    moved = tmp_path / "elsewhere" / out.name
    moved.parent.mkdir()
    out.rename(moved)
    images, _ = synthetic_images(5, seed=3)
    pixels = torch.from_numpy(images).float() / 255
    model = load_model(run / "last.pt")
    expected = model(normalize(torch.from_numpy(images), model.mean, model.std))
    if fmt == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(moved), providers=["CPUExecutionProvider"])
        assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == list(CLASSES)
        got = torch.from_numpy(session.run(["logits"], {"images": pixels.numpy()})[0])
    elif fmt == "torchscript":
        about = {"miniresnet.json": ""}
        got = torch.jit.load(str(moved), _extra_files=about)(pixels)
        assert json.loads(json.loads(about["miniresnet.json"])["classes"]) == list(CLASSES)
    else:  # what we write, we read: load_model and the CLI take the safetensors file as a checkpoint
        loaded = load_model(moved)
        assert loaded.classes == model.classes and torch.equal(loaded.mean, model.mean)
        got = loaded(normalize(torch.from_numpy(images), loaded.mean, loaded.std))
        evaluations = [
            json.loads(run_cli(capsys, "evaluate", str(m), "--data-dir", str(data), "--no-verify-data", "--json")[1])
            for m in (run / "last.pt", moved)
        ]
        assert evaluations[0] == evaluations[1]
    assert got.shape == (5, 10) and (got - expected).abs().max().item() <= 1e-3
    # The exported model takes [0, 1] images, normalisation inside: check one format by hand too,
    # against float64 logits, as close as the float32 model itself comes to them (its error depends
    # on the CPU's kernels; a wrong normalisation would be off by far more).
    if fmt == "torchscript":
        reference = model.double()((pixels.double() - model.mean.view(1, 3, 1, 1)) / model.std.view(1, 3, 1, 1))
        eager_error = (expected.double() - reference).abs().max().item()
        assert (got.double() - reference).abs().max().item() <= 10 * eager_error + 1e-5


def test_model_api_in_one_line(trained):
    _, run = trained
    model = load_model(run / "last.pt")
    assert isinstance(model, MiniResNet) and model.classes == CLASSES and not model.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_is_png_rejects_a_truncated_file(tmp_path):
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "a.png")
    raw = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(raw[: len(raw) // 2] + zlib.compress(b"x")[:3])
    assert is_png(tmp_path / "a.png")
    with pytest.raises((OSError, SyntaxError)):
        is_png(tmp_path / "b.png")
