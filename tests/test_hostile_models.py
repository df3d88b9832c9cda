"""Hostile and malformed model files. Each is refused with one MiniResNetError naming the file,
before anything it describes is allocated; our safetensors reader accepts exactly the files the
reference `safetensors` package accepts; a checkpoint refused for safety names what was refused."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import export_like
from miniresnet import MiniResNet, load_model
from miniresnet.checkpoint import save_checkpoint
from miniresnet.errors import MiniResNetError
from miniresnet.safetensors_file import load_safetensors

CLASSES = ["a", "b", "c"]


def tiny_model() -> MiniResNet:
    return MiniResNet((4, 8, 8), 1, len(CLASSES)).eval()


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A file in the format's layout, whatever the header says (json.dumps writes NaN as NaN)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def some_bytes(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


def written(tmp_path: Path, content: bytes, name: str = "model.safetensors") -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def refused_by_our_reader(path: Path, match: str) -> None:
    with pytest.raises(MiniResNetError, match=match) as refusal:
        load_safetensors(path)
    assert str(path) in str(refusal.value) and "\n" not in str(refusal.value)


TWO_FLOATS = entry("F32", [2], 0, 8)  # the first 8 data bytes


@pytest.mark.parametrize(
    "header",
    [
        {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 0, 16)},  # the same bytes twice
        {"a": entry("F32", [3], 0, 12), "b": entry("F32", [3], 4, 16)},  # sharing 8 bytes
        {"a": entry("F32", [4], 0, 16), "b": entry("F32", [2], 4, 12)},  # one inside the other
    ],
)
def test_tensors_sharing_bytes_are_refused(tmp_path, header):
    refused_by_our_reader(written(tmp_path, safetensors_bytes(header, some_bytes(16))), "may not overlap")


@pytest.mark.parametrize(
    "header, match",
    [
        ({"a": TWO_FLOATS, "b": entry("F32", [1], 12, 16)}, "may not overlap or leave gaps"),  # bytes 8-12 unused
        ({"a": entry("F32", [2], 8, 16)}, "may not overlap or leave gaps"),  # the first 8 bytes unused
        ({"a": TWO_FLOATS}, "the tensors cover 8 of the 16 data bytes"),  # the last 8 bytes unused
    ],
)
def test_data_not_covered_exactly_is_refused(tmp_path, header, match):
    refused_by_our_reader(written(tmp_path, safetensors_bytes(header, some_bytes(16))), match)


def test_a_negative_shape_is_refused(tmp_path):
    header = {"a": entry("F32", [-2, -2], 0, 16)}  # -2 x -2 is 4 floats: 16 bytes, as many as the data
    refused_by_our_reader(written(tmp_path, safetensors_bytes(header, some_bytes(16))), r"shape \[-2, -2\], not a list")


@pytest.mark.parametrize(
    "shape, size, match",
    [
        (["4"], 16, "not a list of whole numbers"),  # strings are no sizes, even of digits
        ([4.0], 16, "not a list of whole numbers"),
        ([True, 4], 16, "not a list of whole numbers"),  # JSON's true is no 1
        ([0, 2**63 - 1, 2], 0, "too large for PyTorch"),  # no elements, but sizes whose strides overflow int64
        ([2**62, 2**62, 0], 0, "too large for PyTorch"),
    ],
)
def test_a_shape_must_be_whole_sizes_giving_the_tensors_bytes(tmp_path, shape, size, match):
    header = {"a": entry("F32", shape, 0, size)}
    refused_by_our_reader(written(tmp_path, safetensors_bytes(header, some_bytes(size))), match)


def test_an_unknown_dtype_is_named_with_the_known_ones(tmp_path):
    header = {"a": entry("F99", [4], 0, 16)}
    refused_by_our_reader(
        written(tmp_path, safetensors_bytes(header, some_bytes(16))), "dtype 'F99'; known dtypes: F64"
    )


@pytest.mark.parametrize("value", [5, None, ["miniresnet"], {"widths": [4, 8, 8]}])
def test_a_metadata_value_that_is_not_a_string_is_refused(tmp_path, value):
    export_like(tiny_model(), tmp_path / "model.safetensors", CLASSES)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (header_size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_size])
    header["__metadata__"]["arch"] = value
    path = written(tmp_path, safetensors_bytes(header, raw[8 + header_size :]))
    refused_by_our_reader(path, "__metadata__ 'arch' is a JSON .*, not a string")
    with pytest.raises(MiniResNetError, match="not a string"):
        load_model(path)


def write_model(path: Path, container: str, model: MiniResNet, **description) -> Path:
    """`model` as a checkpoint or a safetensors export, its description (arch, classes, image_size,
    mean, std) replaced where `description` says."""
    about = {"arch": model.arch(), "classes": CLASSES, "image_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2] * 3}
    about.update(description)
    if container == "checkpoint":
        save_checkpoint({**about, "weights": model.state_dict()}, path)
        return path
    tensors = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    tensors.update({name: torch.tensor(about.pop(name)).view(1, -1, 1, 1) for name in ("mean", "std")})
    metadata = {"format": "miniresnet", **{key: json.dumps(value) for key, value in about.items()}}
    content = safetensors_bytes({"__metadata__": metadata, **header_of(tensors)}, data_of(tensors))
    return written(path.parent, content, path.name)


def header_of(tensors: dict[str, torch.Tensor]) -> dict:
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = entry(names[tensor.dtype], list(tensor.shape), offset, offset + size)
        offset += size
    return header


def data_of(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for tensor in tensors.values())


CONTAINERS = pytest.mark.parametrize("container", ["checkpoint", "export"])
ARCH_REST = {"blocks_per_stage": 1, "num_classes": 3}


@CONTAINERS
def test_a_well_described_model_loads_from_both_containers(tmp_path, container):
    """The writer the tests below corrupt writes files that load, and load the same model."""
    model = tiny_model()
    loaded = load_model(write_model(tmp_path / "model", container, model))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x)) and loaded.classes == tuple(CLASSES) and loaded.image_size == 32


@CONTAINERS
@pytest.mark.parametrize(
    "description, match",
    [
        ({"arch": 5}, "its arch is 5, not a table"),
        ({"arch": [4, 8, 8]}, "its arch is .*, not a table"),
        ({"arch": {"blocks_per_stage": 1, "num_classes": 3}}, "its widths are None"),
        ({"arch": {"widths": [], "blocks_per_stage": 1, "num_classes": 3}}, r"its widths are \[\], not 1 to 8"),
        ({"arch": {"widths": [4, 0, 8], "blocks_per_stage": 1, "num_classes": 3}}, "its widths are"),
        ({"arch": {"widths": ["4", 8, 8], "blocks_per_stage": 1, "num_classes": 3}}, "its widths are"),
        ({"arch": {"widths": [4] * 9, "blocks_per_stage": 1, "num_classes": 3}}, "its widths are"),
        ({"arch": {"widths": [4, 8, 8], "blocks_per_stage": -1, "num_classes": 3}}, "its blocks_per_stage is -1"),
        ({"arch": {"widths": [4, 8, 8], "blocks_per_stage": 17, "num_classes": 3}}, "its blocks_per_stage is 17"),
        ({"arch": {"widths": [4, 8, 8], "blocks_per_stage": 1, "num_classes": 0}}, "its num_classes is 0"),
        ({"arch": {"widths": [4, 8, 8], "blocks_per_stage": 1, "num_classes": 3.0}}, "its num_classes is 3.0"),
        ({"classes": ["a", "b"]}, r"its classes are \['a', 'b'\], not 3 names"),
        ({"classes": ["a", "b", "c", "d"]}, "not 3 names"),
        ({"classes": "abc"}, "its classes are 'abc', not 3 names"),
        ({"classes": [1, 2, 3]}, "not 3 names"),
        ({"image_size": 4}, "its image_size is 4, not a side of 8 to 1024 pixels"),
        ({"image_size": 5000}, "its image_size is 5000"),
        ({"image_size": "32"}, "its image_size is '32'"),
        ({"mean": [0.5, 0.5]}, r"its mean is (\[0.5, 0.5\]|a tensor of shape \(1, 2, 1, 1\)), not 3 numbers"),
        ({"mean": [0.5, float("nan"), 0.5]}, "its mean is .*, not 3 numbers"),
        ({"std": [0.2, 0.0, 0.2]}, "its std is .*; each must be above 0"),
    ],
)
def test_a_malformed_description_is_one_clear_error(tmp_path, container, description, match):
    path = write_model(tmp_path / "model", container, tiny_model(), **description)
    with pytest.raises(MiniResNetError, match=match) as refusal:
        load_model(path)
    assert str(refusal.value).startswith(f"{path} is not a usable model: ") and "\n" not in str(refusal.value)


@CONTAINERS
def test_weights_for_another_arch_are_named_before_the_model_is_built(tmp_path, container, monkeypatch):
    """An arch within the bounds whose weights do not fit: the message says which weight differs,
    and no model is built on a real device (only the meta-device one that gives the shapes)."""
    path = write_model(tmp_path / "model", container, tiny_model(), arch={"widths": [8, 16, 16], **ARCH_REST})
    built_on = []
    original_init = MiniResNet.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(torch.empty(0).device.type)  # the device the constructor's tensors go to
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(MiniResNet, "__init__", recording_init)
    with pytest.raises(MiniResNetError, match=r"widths \(8, 16, 16\).*features.0.0.weight has shape \(4, 3, 3, 3\)"):
        load_model(path)
    assert built_on == ["meta"]


REFUSE_IN_A_CHILD = textwrap.dedent(
    """
    import json, sys, time

    from miniresnet import load_model
    from miniresnet.errors import MiniResNetError

    def peak_mb():
        # This process's own high-water mark (VmHWM). Not ru_maxrss: Linux carries that over from
        # the parent across fork and exec, so a large test runner would count as this child's peak.
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))

    before_mb = peak_mb()
    start = time.perf_counter()
    try:
        load_model(sys.argv[1])
        outcome = "loaded"
    except MiniResNetError as e:
        outcome = str(e)
    seconds = time.perf_counter() - start
    print(json.dumps({"outcome": outcome, "seconds": seconds, "before_mb": before_mb, "peak_mb": peak_mb()}))
    """
)


def refused_in_a_child(path: Path) -> dict:
    """load_model(path) in a fresh Python: its outcome, seconds, and peak RSS before and after (MB)."""
    child = subprocess.run(
        [sys.executable, "-c", REFUSE_IN_A_CHILD, str(path)], capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.splitlines()[-1])
    print(
        f"{path.name}: peak RSS {result['peak_mb']:.0f} MB ({result['before_mb']:.0f} MB before the load), "
        f"{result['seconds']:.3f} s: {result['outcome']}"
    )
    return result


linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM in /proc/self/status")


@linux_only
def test_a_4mb_file_of_400_overlapping_tensors_is_refused_within_1gb(tmp_path):
    size = 4 * 2**20
    header = {f"t{i:03d}": entry("F32", [size // 4], 0, size) for i in range(400)}
    header["__metadata__"] = {"format": "miniresnet", "arch": json.dumps(tiny_model().arch())}
    path = written(tmp_path, safetensors_bytes(header, bytes(size)), "hostile.safetensors")
    result = refused_in_a_child(path)
    assert "may not overlap" in result["outcome"]
    assert result["peak_mb"] < 1024


@linux_only
@pytest.mark.parametrize(
    "arch",
    [
        {"widths": [3000], "blocks_per_stage": 2, "num_classes": 3},  # beyond the bounds: 1.3 GB of weights
        {"widths": [1024] * 4, "blocks_per_stage": 4, "num_classes": 3},  # within them, but the weights are tiny
    ],
)
def test_a_huge_arch_is_refused_quickly_without_allocating_it(tmp_path, arch):
    path = write_model(tmp_path / "huge.safetensors", "export", tiny_model(), arch=arch)
    result = refused_in_a_child(path)
    assert result["outcome"].startswith(f"{path} is not a usable model")
    assert result["peak_mb"] < 1024 and result["seconds"] < 2


class Unlisted:
    """A class torch.load(weights_only=True) does not allow."""


class RunsACommand:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize(
    "payload, refused_global",
    [
        (RunsACommand(), f"{os.system.__module__}.{os.system.__name__}"),  # a blocked module
        (Unlisted(), f"{Unlisted.__module__}.{Unlisted.__qualname__}"),  # a global not allowed
    ],
)
def test_a_checkpoint_refused_for_safety_names_the_refused_global(tmp_path, payload, refused_global):
    torch.save({"format": "miniresnet-checkpoint", "weights": payload}, tmp_path / "evil.pt")
    with pytest.raises(MiniResNetError) as refusal:
        load_model(tmp_path / "evil.pt")
    message = str(refusal.value)
    assert message.startswith(f"{tmp_path / 'evil.pt'} was refused for safety: it holds Python objects other than")
    assert f"(the refused global: {refused_global})" in message
    assert "weights_only=False" not in message and "\n" not in message


@pytest.mark.parametrize(
    "content, kind",
    [
        ('{"arch": {"widths": [16, 32, 64]}, "classes": ["cat"]}\n', "JSON"),
        ("[1, 2, 3]", "JSON"),
        ("\ufeff  {}", "JSON"),
        ("weights, as I remember them: 0.1 0.2\n", "text"),
        ("ünïcödé " * 1000, "text"),  # a character cut in two where the sniffed start ends
    ],
)
def test_a_text_file_given_as_a_model_is_named_as_such(tmp_path, content, kind):
    (tmp_path / "model.json").write_text(content, encoding="utf-8")
    with pytest.raises(MiniResNetError) as refusal:
        load_model(tmp_path / "model.json")
    assert str(refusal.value) == (
        f"{tmp_path / 'model.json'} is not a model file: it looks like {kind}; give a checkpoint (.pt) from "
        "`miniresnet train`, a safetensors export (`miniresnet export --format safetensors`) or a shipped "
        "model's name (`miniresnet models` lists them)"
    )


@pytest.mark.parametrize("fmt, kind", [("JPEG", "a JPEG image"), ("PNG", "a PNG image"), ("WEBP", "a WebP image")])
def test_an_image_given_as_the_model_is_named_as_such(tmp_path, capsys, fmt, kind):
    """`predict cat.jpg cat.jpg` (the model left out): the image is named an image, not a corrupt checkpoint."""
    from PIL import Image

    from miniresnet.cli import main

    image = tmp_path / "cat.img"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image, fmt)
    assert main(["predict", str(image), str(image)]) == 1
    err = capsys.readouterr().err
    assert f"{image} is not a model file: it looks like {kind}; give a checkpoint" in err
    assert err.rstrip().endswith("before the images")


# Files the format's rules accept (named "valid...") or refuse, for both readers.
CRAFTED = {
    "valid": safetensors_bytes({"a": TWO_FLOATS, "b": entry("I64", [1], 8, 16)}, some_bytes(16)),
    "valid, unaligned": safetensors_bytes({"a": entry("U8", [3], 0, 3), "b": entry("F32", [3], 3, 15)}, some_bytes(15)),
    "valid, empty tensors": safetensors_bytes(
        {"a": entry("F32", [0], 0, 0), "b": entry("BF16", [2, 0], 0, 0), "c": entry("F16", [8], 0, 16)},
        some_bytes(16),
    ),
    "valid, no tensors": safetensors_bytes({"__metadata__": {"x": "y"}}, b""),
    "valid, null metadata": safetensors_bytes({"__metadata__": None, "a": entry("F64", [2], 0, 16)}, some_bytes(16)),
    "valid, extra fields": safetensors_bytes({"a": {**entry("F32", [4], 0, 16), "note": 1}}, some_bytes(16)),
    "overlapping": safetensors_bytes({"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 0, 16)}, some_bytes(16)),
    "gap": safetensors_bytes({"a": entry("F32", [1], 0, 4), "b": entry("F32", [2], 8, 16)}, some_bytes(16)),
    "leading gap": safetensors_bytes({"a": entry("F32", [2], 8, 16)}, some_bytes(16)),
    "trailing bytes": safetensors_bytes({"a": TWO_FLOATS}, some_bytes(16)),
    "reversed offsets": safetensors_bytes({"a": entry("F32", [0], 16, 0)}, some_bytes(16)),
    "negative shape": safetensors_bytes({"a": entry("F32", [-2, -2], 0, 16)}, some_bytes(16)),
    "size mismatch": safetensors_bytes({"a": entry("F32", [3], 0, 16)}, some_bytes(16)),
    "float shape": safetensors_bytes({"a": entry("F32", [4.0], 0, 16)}, some_bytes(16)),
    "string shape": safetensors_bytes({"a": entry("F32", ["4"], 0, 16)}, some_bytes(16)),
    "boolean shape": safetensors_bytes({"a": entry("F32", [True, 4], 0, 16)}, some_bytes(16)),
    "huge shape": safetensors_bytes({"a": entry("F32", [2**40, 2**40, 2**40], 0, 16)}, some_bytes(16)),
    "unknown dtype": safetensors_bytes({"a": entry("F99", [4], 0, 16)}, some_bytes(16)),
    "three offsets": safetensors_bytes({"a": {**TWO_FLOATS, "data_offsets": [0, 8, 16]}}, some_bytes(8)),
    "entry not an object": safetensors_bytes({"a": [0, 16]}, some_bytes(16)),
    "metadata value a number": safetensors_bytes({"__metadata__": {"x": 5}, "a": TWO_FLOATS}, some_bytes(8)),
    "metadata value NaN": safetensors_bytes({"__metadata__": {"x": float("nan")}, "a": TWO_FLOATS}, some_bytes(8)),
    "metadata an array": safetensors_bytes({"__metadata__": ["x"], "a": TWO_FLOATS}, some_bytes(8)),
    "header an array": struct.pack("<Q", 2) + b"[]",
    "header not UTF-8": struct.pack("<Q", 8) + '{"é":1}'.encode("latin-1").ljust(8),
    "header UTF-16": struct.pack("<Q", 4) + "{}".encode("utf-16-le"),
    "header length beyond the file": struct.pack("<Q", 10**6) + b"{}",
    "header length 0": struct.pack("<Q", 0),
    "shorter than a header length": b"\x02\x00\x00",
}


def test_the_reference_reader_and_ours_accept_the_same_files(tmp_path):
    """Every crafted file is accepted by both readers, with the same tensors, or refused by both."""
    SafetensorError = pytest.importorskip("safetensors").SafetensorError
    load_file = pytest.importorskip("safetensors.torch").load_file
    disagreements, accepted = [], []
    for name, content in CRAFTED.items():
        path = written(tmp_path, content, "crafted.safetensors")
        try:
            theirs = load_file(str(path))
        except SafetensorError:
            theirs = None
        try:
            ours = load_safetensors(path)[0]
        except MiniResNetError:
            ours = None
        if (theirs is None) != (ours is None):
            disagreements.append(f"{name}: the reference {'refuses' if theirs is None else 'accepts'} it, we do not")
        elif ours is not None and not (
            ours.keys() == theirs.keys()
            and all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
        ):
            disagreements.append(f"{name}: the tensors differ")
        if ours is not None:
            accepted.append(name)
    assert disagreements == []
    assert accepted == [name for name in CRAFTED if name.startswith("valid")]


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    export_like(tiny_model(), path, CLASSES)
    return path


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def places_in(tree: object) -> list[tuple]:
    """Every place in a JSON tree, as the keys and indices that lead to it."""
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    return [(), *((key, *rest) for key, child in children for rest in places_in(child))]


def replaced(tree: object, place: tuple, value: object) -> object:
    """A copy of `tree` with `value` at `place`."""
    if not place:
        return value
    copy = dict(tree) if isinstance(tree, dict) else list(tree)
    copy[place[0]] = replaced(tree[place[0]], place[1:], value)
    return copy


def mutated(original: bytes, data: st.DataObject) -> bytes:
    """`original` with bytes flipped, cut short, or one value of its header (or of the JSON in its
    metadata: the arch, classes and image size) replaced by any JSON value."""
    how = data.draw(st.sampled_from(["bytes", "cut", "header", "metadata"]))
    if how == "bytes":
        out = bytearray(original)
        for position, value in data.draw(
            st.lists(st.tuples(st.integers(0, len(out) - 1), st.integers(0, 255)), max_size=8)
        ):
            out[position] = value
        return bytes(out)
    if how == "cut":
        return original[: data.draw(st.integers(0, len(original) - 1))]
    (header_size,) = struct.unpack("<Q", original[:8])
    header, tensor_bytes = json.loads(original[8 : 8 + header_size]), original[8 + header_size :]
    if how == "metadata":
        key = data.draw(st.sampled_from(["arch", "classes", "image_size"]))
        described = json.loads(header["__metadata__"].get(key, "32"))
        place = data.draw(st.sampled_from(places_in(described)))
        header["__metadata__"][key] = json.dumps(replaced(described, place, data.draw(JSON_VALUES)))
    else:
        header = replaced(header, data.draw(st.sampled_from(places_in(header))), data.draw(JSON_VALUES))
    return safetensors_bytes(header, tensor_bytes)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data())
def test_a_mutated_model_file_loads_or_is_one_clear_error(exported_file, data):
    path = exported_file.with_name("mutated.safetensors")
    path.write_bytes(mutated(exported_file.read_bytes(), data))
    try:
        model = load_model(path)
    except MiniResNetError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert len(model.classes) == model.fc.out_features and model.mean.shape == model.std.shape == (3,)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, model.fc.out_features)
