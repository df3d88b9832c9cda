"""Shipped models: named everywhere a model file goes, checked against their cards before use,
loadable through torch.hub with torch alone; and the safetensors format we write and read."""

from __future__ import annotations

import ast
import json
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import miniresnet.pretrained as pretrained
from conftest import export_like, make_dataset, script_module, tiny_config
from miniresnet import MiniResNet, load_model
from miniresnet.cli import build_parser, config_from_args, main
from miniresnet.data import load_cifar10
from miniresnet.errors import MiniResNetError
from miniresnet.safetensors_file import load_safetensors, save_safetensors
from miniresnet.train import train

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = pretrained.shipped_cards()


def some_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(4, 3, 3, 3, generator=generator),
        "double": torch.randn(5, generator=generator, dtype=torch.float64),
        "half": torch.randn(2, 3, generator=generator).bfloat16(),
        "count": torch.tensor(7, dtype=torch.int64),  # 0-d, as BatchNorm's num_batches_tracked
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def test_our_safetensors_files_and_the_reference_librarys_read_each_other(tmp_path):
    reference = pytest.importorskip("safetensors.torch")
    tensors, metadata = some_tensors(), {"format": "miniresnet", "note": "ünïcode"}
    save_safetensors(tensors, metadata, tmp_path / "ours.safetensors")
    read_by_reference = reference.load_file(str(tmp_path / "ours.safetensors"))
    reference.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata)
    read_by_us, their_metadata = load_safetensors(tmp_path / "theirs.safetensors")
    assert their_metadata == metadata
    for name, tensor in tensors.items():
        for got in (read_by_reference[name], read_by_us[name]):
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)
    assert load_safetensors(tmp_path / "ours.safetensors")[1] == metadata


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated inside the data
        lambda raw: raw[:20],  # truncated inside the header
        lambda raw: b"\xff" * 8 + raw[8:],  # a header length beyond the file
        lambda raw: raw[:8] + b"[" + raw[9:],  # a header that is not JSON
        lambda raw: b"",
    ],
)
def test_a_damaged_safetensors_file_is_a_clear_error(tmp_path, damage):
    save_safetensors(some_tensors(), {}, tmp_path / "a.safetensors")
    (tmp_path / "a.safetensors").write_bytes(damage((tmp_path / "a.safetensors").read_bytes()))
    with pytest.raises(MiniResNetError, match="not a readable safetensors file"):
        load_safetensors(tmp_path / "a.safetensors")


@pytest.fixture
def shipped_here(tmp_path, monkeypatch) -> tuple[str, MiniResNet]:
    """A shipped model `tiny` in a weights directory of the test's own."""
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    model = MiniResNet((4, 8, 8), 1, 3).eval()
    export_like(model, tmp_path / "weights" / "tiny.safetensors", ["a", "b", "c"])
    card = {
        "name": "tiny",
        "file": "tiny.safetensors",
        "sha256": pretrained.sha256_of(tmp_path / "weights" / "tiny.safetensors"),
        "test_accuracy": {"plain": 0.5, "tta": 0.55, "tta_mode": "flip"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "command": "miniresnet train --preset tiny",
    }
    (tmp_path / "weights" / "tiny.json").write_text(json.dumps(card))
    return "tiny", model


def test_a_shipped_name_loads_the_shipped_model(shipped_here, tmp_path, monkeypatch, capsys):
    name, original = shipped_here
    model = load_model(name)
    assert model.classes == ("a", "b", "c") and not model.training
    assert torch.allclose(model.mean, torch.tensor([0.5, 0.4, 0.3])) and torch.allclose(
        model.std, torch.tensor([0.2, 0.25, 0.3])
    )
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), original(x))
    assert main(["models"]) == 0
    assert "tiny" in capsys.readouterr().out
    # A file of that name wins over the shipped model (the user meant their file).
    monkeypatch.chdir(tmp_path)
    export_like(MiniResNet((4, 8, 8), 1, 2), tmp_path / name, ["x", "y"])
    assert load_model(name).classes == ("x", "y")


def test_an_unknown_name_lists_the_shipped_ones(shipped_here):
    with pytest.raises(MiniResNetError, match=r"'tinny' is neither a file nor a shipped model \(shipped: tiny;"):
        load_model("tinny")
    with pytest.raises(MiniResNetError, match="checkpoint runs/x.pt does not exist"):
        load_model("runs/x.pt")


def test_a_shipped_file_whose_bytes_changed_is_refused(shipped_here):
    name, _ = shipped_here
    path = pretrained.WEIGHTS_DIR / f"{name}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1  # one bit of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(MiniResNetError, match="the shipped model 'tiny' was changed: .* it was not loaded"):
        load_model(name)


def test_another_safetensors_file_is_not_taken_for_a_model(tmp_path):
    save_safetensors({"w": torch.zeros(2)}, {}, tmp_path / "other.safetensors")
    with pytest.raises(MiniResNetError, match="not a miniresnet model"):
        load_model(tmp_path / "other.safetensors")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_file_matches_its_card(name):
    card = SHIPPED[name]
    path = pretrained.WEIGHTS_DIR / card["file"]
    assert pretrained.sha256_of(path) == card["sha256"] and path.stat().st_size == card["bytes"]
    model = load_model(name)
    assert list(model.classes) == card["classes"] and model.arch() == card["architecture"]
    assert model.mean.tolist() == card["mean"] and model.std.tolist() == card["std"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


@pytest.mark.parametrize("card_path", sorted((ROOT / "benchmarks" / "teachers").glob("*.json")), ids=lambda p: p.stem)
def test_each_kept_teacher_matches_the_card_beside_it(card_path):
    """A teacher kept with the results: its file is the one its card measured, and loads as that architecture."""
    card = json.loads(card_path.read_text())
    path = card_path.with_name(card["file"])
    assert pretrained.sha256_of(path) == card["sha256"] and path.stat().st_size == card["bytes"]
    model = load_model(path)
    assert model.arch() == card["architecture"] and model.temperature == card["calibration"]["temperature"]
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


def test_the_shipped_models_and_the_model_card_agree():
    """`best` (the default), `best-jpeg` and `seed` ship, and MODEL_CARD.md is what their cards generate."""
    assert pretrained.DEFAULT_MODEL == "best" and set(SHIPPED) == {"best", "best-jpeg", "seed"}
    model_card_markdown = script_module("scripts/ship_model.py").model_card_markdown
    assert (ROOT / "MODEL_CARD.md").read_text() == model_card_markdown(SHIPPED)


def test_a_card_names_each_teacher_of_an_ensemble():
    """A model distilled from `--teacher best,best-jpeg`: its card's recipe line names both members,
    each with what its own card says of it, where a single teacher's line names one."""
    script = script_module("scripts/ship_model.py")
    teacher_of, teacher_text = script.teacher_of, script.teacher_text
    members = [
        {"model": name, "sha256": SHIPPED[name]["sha256"], "arch": SHIPPED[name]["architecture"]}
        for name in ("best", "best-jpeg")
    ]
    teacher = teacher_of({"teacher": {"model": "best,best-jpeg", "sha256": "0" * 64, "members": members}})
    text = teacher_text({"teacher": teacher})
    assert text.startswith(" It learned from the mean logits of the teachers `best` (")
    for name in ("best", "best-jpeg"):
        card = SHIPPED[name]
        assert f"`{name}` (Mini-ResNet 16/32/64, sha256 `{card['sha256'][:12]}`; " in text
        assert f"{card['test_accuracy']['plain']:.2%}" in text and f"trained by `{card['command']}`" in text
    alone = teacher_text({"teacher": teacher_of({"teacher": members[0]})})
    assert alone.startswith(" It learned from the teacher `best` (") and "best-jpeg" not in alone


def test_a_card_names_the_model_it_started_from(capsys):
    """A model trained on from a shipped one (--init best-jpeg): its card's recipe line names that model with
    what its own card says (so a model that replaces it keeps its recipe); one trained from scratch says nothing."""
    script = script_module("scripts/ship_model.py")
    init_of, init_text = script.init_of, script.init_text
    card = SHIPPED["best-jpeg"]
    record = {"model": "best-jpeg", "sha256": card["sha256"], "classes": card["classes"], "kept_last_layer": True}
    start = init_of({"init": record})
    assert start["command"] == card["command"] and start["commit"] == card["commit"] and "classes" not in start
    text = init_text({"init": start})
    assert text.startswith(f" It started from the weights of `best-jpeg` (sha256 `{card['sha256'][:12]}`; ")
    assert f"trained by `{card['command']}` at commit `{card['commit'][:12]}`" in text
    assert init_of({}) is None and init_text({"init": None}) == ""
    assert "warning" not in capsys.readouterr().err
    other = init_text({"init": init_of({"init": record | {"sha256": "0" * 64}})})  # not the shipped file
    assert (
        other
        == f" It started from the weights of `best-jpeg` (sha256 `{'0' * 12}`), whose training counts in its cost too."
    )
    assert f"but the shipped `best-jpeg` is for {card['sha256'][:12]}" in capsys.readouterr().err


def test_a_card_describes_a_teacher_that_is_not_shipped_from_the_card_beside_its_file(tmp_path, capsys):
    """A teacher kept with the results (`ship_model.py --to DIR` writes teacher.safetensors and teacher.json):
    a student's card states its architecture, accuracy and recipe from that card, for that file only."""
    script = script_module("scripts/ship_model.py")
    teacher_of, teacher_text = script.teacher_of, script.teacher_text
    teacher = tmp_path / "teachers" / "wide.safetensors"
    teacher.parent.mkdir()
    shutil.copy(pretrained.shipped_weights("seed"), teacher)
    card = SHIPPED["seed"] | {"name": "wide"}
    (tmp_path / "teachers" / "wide.json").write_text(json.dumps(card))
    record = {"model": str(teacher), "sha256": card["sha256"], "arch": card["architecture"]}
    text = teacher_text({"teacher": teacher_of({"teacher": record})})
    assert text.startswith(f" It learned from the teacher `{teacher}` (Mini-ResNet 16/32/64, sha256 `")
    assert f"{card['test_accuracy']['plain']:.2%}" in text and f"trained by `{card['command']}`" in text
    assert "warning" not in capsys.readouterr().err
    changed = teacher_text({"teacher": teacher_of({"teacher": record | {"sha256": "0" * 64}})})
    assert "trained by" not in changed
    assert f"but the card {teacher.with_suffix('.json')} is for" in capsys.readouterr().err
    (tmp_path / "teachers" / "wide.json").unlink()  # no card: the run's record alone
    assert "trained by" not in teacher_text({"teacher": teacher_of({"teacher": record})})


def test_a_cards_command_names_no_directory_of_the_machine_that_trained_it():
    portable = script_module("scripts/ship_model.py").portable
    command = (
        "miniresnet train --init /work/runs/base-s0/last.pt --data-dir /work/shared/cifar10 --out /work/runs/ft-lr04"
    )
    expected = "miniresnet train --init runs/base-s0/last.pt --data-dir DIR --out runs/best-jpeg"
    assert portable(command, "best-jpeg") == expected
    assert portable(expected, "best-jpeg") == expected
    assert portable("resumed with --resume /tmp/x/runs/best-s0", "best") == "resumed with --resume runs/best"


def test_each_card_command_still_trains_what_made_its_model():
    """Presets change; a card's command must still mean its run (epochs, TTA) with today's presets."""
    for name, card in SHIPPED.items():
        args = build_parser().parse_args(shlex.split(card["command"])[1:])
        cfg = config_from_args(args)
        assert (cfg.epochs, cfg.tta) == (card["epochs"], card["preset_tta"]), name
        assert cfg.seed == card["seed"] and "runs/" in cfg.out_dir and cfg.data_dir == "DIR", name


HUB_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    # Only torch: any other package the hub path imports fails here.
    for blocked in ("numpy", "PIL", "matplotlib", "tqdm", "safetensors", "onnx", "onnxruntime", "tensorboard"):
        sys.modules[blocked] = None
    model = torch.hub.load(sys.argv[1], "mini_resnet", source="local", pretrained=True)  # the default model
    untrained = torch.hub.load(sys.argv[1], "mini_resnet", source="local", num_classes=4)
    for contradictory in (dict(pretrained=True, num_classes=100), dict(weights="seed")):
        try:
            torch.hub.load(sys.argv[1], "mini_resnet", source="local", **contradictory)
        except ValueError:
            continue
        raise AssertionError(f"accepted {contradictory}")
    torch.save(
        {"weights": model.state_dict(), "classes": list(model.classes), "mean": model.mean, "std": model.std,
         "training": model.training, "untrained_out": untrained.fc.out_features,
         "module": type(model).__module__ + "." + type(model).__name__},
        sys.argv[2],
    )
    """
)


def test_torch_hub_loads_the_shipped_model_with_torch_alone(tmp_path):
    (tmp_path / pretrained.DEFAULT_MODEL).mkdir()  # a folder of that name where it runs changes nothing
    subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(ROOT), str(tmp_path / "hub.pt")], check=True, cwd=tmp_path)
    hub = torch.load(tmp_path / "hub.pt", weights_only=True)
    model = load_model(pretrained.DEFAULT_MODEL)
    assert hub["module"] == "miniresnet.model.MiniResNet" and not hub["training"] and hub["untrained_out"] == 4
    assert hub["classes"] == list(model.classes)
    assert torch.equal(hub["mean"], model.mean) and torch.equal(hub["std"], model.std)
    assert hub["weights"].keys() == model.state_dict().keys()
    assert all(torch.equal(hub["weights"][k], v) for k, v in model.state_dict().items())


def test_the_readmes_python_example_classifies_an_image_with_the_shipped_model(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = next(block for block in readme.split("```python\n")[1:] if "from miniresnet import load_model" in block)
    example = example.split("```")[0]
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "cat.jpg")
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, check=True)
    (ranked,) = ast.literal_eval(result.stdout)
    assert {c for c, _ in ranked} <= set(SHIPPED[pretrained.DEFAULT_MODEL]["classes"]) and len(ranked) == 3
    assert 0 < sum(p for _, p in ranked) <= 1.000001 and ranked == sorted(ranked, key=lambda r: -r[1])


def test_ship_model_to_a_folder_writes_the_model_and_its_card_there_and_ships_nothing(tmp_path, monkeypatch):
    """`--to DIR` keeps a model with the results (such as a teacher): its file and card go to DIR, and the
    package's shipped models and MODEL_CARD.md stay as they are."""
    script = script_module("scripts/ship_model.py")
    data = make_dataset(tmp_path / "data")
    train(tiny_config(data, tmp_path / "runs" / "wide", widths=(8, 16, 32), epochs=1, val_split=50))
    monkeypatch.setattr(script, "load_cifar10", lambda data_dir: load_cifar10(data_dir, verify=False))
    shipped_before = {p.name: p.read_bytes() for p in pretrained.WEIGHTS_DIR.iterdir()}
    model_card_before = (ROOT / "MODEL_CARD.md").read_bytes()
    command = f"miniresnet train --widths 8 16 32 --data-dir {data} --out {tmp_path}/runs/wide"
    argv = [str(tmp_path / "runs" / "wide"), "wide", "--data-dir", str(data), "--to", str(tmp_path / "teachers")]
    argv += ["--command", command, "--commit", "0" * 40, "--description", "a wider Mini-ResNet, a teacher"]
    monkeypatch.setattr(sys, "argv", ["ship_model.py", *argv])
    script.main()
    card = json.loads((tmp_path / "teachers" / "wide.json").read_text())
    assert card["description"] == "a wider Mini-ResNet, a teacher" and card["architecture"]["widths"] == [8, 16, 32]
    assert card["command"] == "miniresnet train --widths 8 16 32 --data-dir DIR --out runs/wide"
    assert card["sha256"] == pretrained.sha256_of(tmp_path / "teachers" / "wide.safetensors")
    assert load_model(tmp_path / "teachers" / "wide.safetensors").arch()["widths"] == [8, 16, 32]
    assert {p.name: p.read_bytes() for p in pretrained.WEIGHTS_DIR.iterdir()} == shipped_before
    assert (ROOT / "MODEL_CARD.md").read_bytes() == model_card_before
