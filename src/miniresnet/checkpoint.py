"""Checkpoints: what they hold (one function says it), written atomically (a crash leaves the old
file or the new one, never half of one) and loaded with `weights_only=True`, so a checkpoint can
hold tensors and plain data but never code."""

from __future__ import annotations

import codecs
import json
import math
import re
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from .ema import EMA
from .errors import MiniResNetError
from .files import torch_save_atomically
from .model import MiniResNet
from .pretrained import sha256_of, shipped_weights
from .safetensors_file import load_safetensors, looks_like_safetensors

FORMAT = "miniresnet-checkpoint"
RENAMED_KEYS = {"model": "weights", "trained_model": "trained_weights"}
WEIGHTS_ONLY_REFUSAL = "Weights only load failed"  # how torch.load(weights_only=True) starts saying it refused a file
# PyTorch names a refused global as "Unsupported global: GLOBAL x.y was not..." or "...GLOBAL x.y whose module..."
REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")

# Bounds on the model a file describes, checked before anything is built: far beyond any MiniResNet
# trained here, far short of what a hostile file would need to exhaust memory.
MAX_STAGES = 8  # each stage after the first halves the image: 8 take 256 pixels to 2
MAX_WIDTH = 1024  # channels in a stage: 16 times the seed spec's widest
MAX_BLOCKS_PER_STAGE = 16  # a ResNet-110 has 18 blocks per stage; MiniResNets have 1 to 4
MAX_CLASSES = 100_000  # ImageNet-21k has ~22,000 classes
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # the side images are prepared at, in pixels; CIFAR's is 32


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write atomically: a crash leaves the previous checkpoint or this one."""
    path = Path(path)
    try:
        torch_save_atomically({"format": FORMAT, **state}, path)
    except OSError as e:  # a full disk, a lost mount, no permission
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        raise MiniResNetError(
            f"could not save the checkpoint {path}: {e.strerror or e}; {kept}. "
            "Free some space (or choose another --out) and resume"
        ) from None


def training_checkpoint(
    model: MiniResNet,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    scaler: torch.amp.GradScaler,
    *,
    epoch: int,
    tally: dict,
    history: list[dict],
    best_val: float,
    seconds: float,
    classes: tuple[str, ...],
    image_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    data_fingerprint: str,
    config: dict,
    device: torch.device,
    init: dict | None = None,
    teacher: dict | None = None,
    temperature: float = 1.0,
) -> dict:
    """What a checkpoint holds. To use the model: `arch`, `weights` (the EMA average when EMA is
    on), `classes`, `image_size` (the side images are prepared at), `mean` and `std`. To continue
    the run exactly: the `data_fingerprint` (the SHA-256 of the images and labels trained on, which
    a resume checks), the `config`, `epoch` (finished epochs), the optimizer's `trained_weights`
    (only when EMA is on: otherwise they are `weights`), the optimizer, EMA and fp16 loss-scaler
    states, the current epoch's `tally` (its step and running sums), the metrics `history`,
    `best_val`, the `seconds` spent so far and the random number generators. A fine-tuned run's
    `init` says which model it started from (name, sha256, classes), a distilled run's `teacher` which
    model it learned from (name, sha256, arch, classes). `temperature` calibrates the
    probabilities (fitted on the validation split after the last epoch; 1 until then, or without one)."""
    return {
        "arch": model.arch(),
        "weights": (ema.model if ema else model).state_dict(),
        "classes": list(classes),
        "image_size": image_size,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "temperature": temperature,
        "data_fingerprint": data_fingerprint,
        "config": config,
        "init": init,
        "teacher": teacher,
        "epoch": epoch,
        "trained_weights": model.state_dict() if ema else None,
        "optimizer": portable_optimizer_state(optimizer),
        "ema": ema.state_dict() if ema else None,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "tally": tally,
        "history": history,
        "best_val": best_val,
        "seconds": seconds,
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        },
    }


def portable_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with each group's lr a number and nothing recorded for a CUDA graph:
    a run that replays its step as a graph holds the lr in a device tensor (step.GraphStep), and its
    checkpoint resumes anywhere, eagerly or as a graph."""
    state = optimizer.state_dict()
    for group in state.get("param_groups", []):  # Lookahead nests its optimizer's, and is never recorded
        group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return state


def restore_training(
    state: dict,
    model: MiniResNet,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> None:
    """Put a `training_checkpoint`'s weights, optimizer, EMA, loss-scaler and random state back in place."""
    model.load_state_dict(state["trained_weights"] if ema else state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    if ema:
        ema.load_state_dict(state["ema"])
    if scaler.is_enabled() and state.get("scaler"):  # checkpoints from before the scaler have none
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MiniResNetError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # on bytes that are no checkpoint, torch.load raises many types (KeyError, IndexError...)
        raise MiniResNetError(refused_checkpoint_message(path, e)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MiniResNetError(f"{path} is a PyTorch file but not a miniresnet checkpoint")
    for old, new in RENAMED_KEYS.items():  # checkpoints written before the rename still load
        if old in state and new not in state:
            state[new] = state.pop(old)
    return state


def refused_checkpoint_message(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) did not load `path`, without PyTorch's advice to load it
    with weights_only=False (which runs whatever code the file holds)."""
    text = str(error)
    refused_global = REFUSED_GLOBAL.search(text) if text.startswith(WEIGHTS_ONLY_REFUSAL) else None
    if refused_global:
        return (
            f"{path} was refused for safety: it holds Python objects other than tensors and plain data "
            f"(the refused global: {refused_global[1]}), and loading those could run code; "
            "a miniresnet checkpoint holds only tensors and plain data"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    reason = lines[0] if lines else type(error).__name__
    if text.startswith(WEIGHTS_ONLY_REFUSAL):
        return (
            f"{path} is not a readable checkpoint: PyTorch's safe loader, which takes only tensors and plain data, "
            f"stopped without naming a refused global (the file is corrupt or holds other Python objects): {reason}"
        )
    return f"{path} is not a readable checkpoint (truncated, corrupt, or not a PyTorch file): {reason}"


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the 'module.' (DistributedDataParallel) and '_orig_mod.' (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


class Arch(NamedTuple):
    """A MiniResNet's architecture, in the order MiniResNet takes it."""

    widths: tuple[int, ...]
    blocks_per_stage: int
    num_classes: int


def model_from_checkpoint(state: dict, source: str | Path = "the checkpoint") -> MiniResNet:
    """The model a checkpoint or an export (`read_model`'s dict) describes, carrying its `classes`,
    `image_size` and input normalisation (`mean`, `std`, [0, 1] scale). Everything is checked
    before the model is built: the arch against the bounds above, the weights' names and shapes
    against that arch's, so a file cannot make this allocate more than the weights it holds.
    Anything amiss is one MiniResNetError naming `source`."""
    arch = checked_arch(state.get("arch"), source)
    weights = checked_weights(state.get("weights"), arch, source)
    classes = state.get("classes")
    if not (isinstance(classes, list | tuple) and len(classes) == arch.num_classes and all_strings(classes)):
        raise unusable(source, f"its classes are {shown(classes)}, not {arch.num_classes} names (its num_classes)")
    image_size = state.get("image_size", 32)  # checkpoints before image folders: CIFAR's 32
    if not is_whole(image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE):
        raise unusable(
            source,
            f"its image_size is {shown(image_size)}, not a side of {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels",
        )
    mean = checked_channel_values("mean", state.get("mean"), source)
    std = checked_channel_values("std", state.get("std"), source)
    if min(std) <= 0:
        raise unusable(source, f"its std is {std}; each must be above 0 (images are divided by it)")
    temperature = state.get("temperature", 1.0)  # models from before calibration: the plain softmax
    if not (is_finite_number(temperature) and temperature > 0):
        raise unusable(source, f"its temperature is {shown(temperature)}, not a number above 0")
    model = MiniResNet(*arch)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:  # the names and shapes fit, but PyTorch cannot copy some tensor (a meta one, say)
        raise unusable(source, f"its weights could not be copied into the model: {first_line(e)}") from None
    model.classes, model.image_size = tuple(classes), image_size
    model.mean, model.std = torch.tensor(mean), torch.tensor(std)
    model.temperature = float(temperature)
    return model


def checked_arch(arch: object, source: str | Path) -> Arch:
    """`arch` as an Arch, when it is a table of widths, blocks_per_stage and num_classes within the bounds."""
    if not isinstance(arch, dict):
        raise unusable(source, f"its arch is {shown(arch)}, not a table of widths, blocks_per_stage and num_classes")
    widths, blocks_per_stage, num_classes = arch.get("widths"), arch.get("blocks_per_stage"), arch.get("num_classes")
    if not (
        isinstance(widths, list | tuple)
        and 1 <= len(widths) <= MAX_STAGES
        and all(is_whole(width, 1, MAX_WIDTH) for width in widths)
    ):
        raise unusable(
            source, f"its widths are {shown(widths)}, not 1 to {MAX_STAGES} stage widths from 1 to {MAX_WIDTH}"
        )
    if not is_whole(blocks_per_stage, 0, MAX_BLOCKS_PER_STAGE):
        raise unusable(source, f"its blocks_per_stage is {shown(blocks_per_stage)}, not 0 to {MAX_BLOCKS_PER_STAGE}")
    if not is_whole(num_classes, 1, MAX_CLASSES):
        raise unusable(source, f"its num_classes is {shown(num_classes)}, not 1 to {MAX_CLASSES:,}")
    return Arch(tuple(widths), blocks_per_stage, num_classes)


def checked_weights(weights: object, arch: Arch, source: str | Path) -> dict[str, torch.Tensor]:
    """`weights` without their DDP and compile prefixes, when their names and shapes are exactly
    those of the model `arch` describes (compared with one built on the meta device: no memory)."""
    if not (isinstance(weights, dict) and all_strings(weights) and all_tensors(weights.values())):
        raise unusable(source, "its weights are not a table of named tensors")
    weights = strip_prefixes(weights)
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in MiniResNet(*arch).state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    differences = [f"{name} is missing" for name in expected if name not in found]
    differences += [f"{name} is not in that model" for name in found if name not in expected]
    differences += [
        f"{name} has shape {found[name]} where that model has {shape}"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    if differences:
        more = f" (and {len(differences) - 1} more differences)" if len(differences) > 1 else ""
        raise unusable(
            source,
            f"its weights do not fit the model its arch describes (widths {arch.widths}, {arch.blocks_per_stage} "
            f"blocks per stage, {arch.num_classes} classes): {differences[0]}{more}",
        )
    return weights


def checked_channel_values(name: str, values: object, source: str | Path) -> list[float]:
    """The 3 per-channel numbers `name` (mean or std) holds, from a list or (in an export) a tensor."""
    if isinstance(values, torch.Tensor) and values.numel() == 3:
        values = values.flatten().tolist()
    if not (isinstance(values, list | tuple) and len(values) == 3 and all(is_finite_number(v) for v in values)):
        raise unusable(source, f"its {name} is {shown(values)}, not 3 numbers (one per RGB channel)")
    return [float(v) for v in values]


def unusable(source: str | Path, problem: str) -> MiniResNetError:
    return MiniResNetError(f"{source} is not a usable model: {problem}")


def shown(value: object) -> str:
    """`value` for a message, cut short when long (a hostile file's values can be huge)."""
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else reprlib.repr(value)


def first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def all_strings(values: Iterable) -> bool:
    return all(isinstance(value, str) for value in values)


def all_tensors(values: Iterable) -> bool:
    return all(isinstance(value, torch.Tensor) for value in values)


def read_exported_model(path: str | Path) -> dict:
    """What `model_from_checkpoint` needs (arch, weights, classes, image_size, mean, std) from a
    `miniresnet export --format safetensors` file: a normalised model's tensors, plus the
    architecture, classes and image size as JSON in its metadata."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != "miniresnet":
        raise MiniResNetError(f"{path} is a safetensors file but not a miniresnet model (no miniresnet metadata)")
    missing = [key for key in ("arch", "classes") if key not in metadata]
    missing += [name for name in ("mean", "std") if name not in tensors]
    if missing:
        raise MiniResNetError(f"{path} is a miniresnet safetensors file without its {' and '.join(missing)}")
    described = {}
    for key in ("arch", "classes", "image_size", "temperature"):  # older exports lack the last two
        if key in metadata:
            try:
                described[key] = json.loads(metadata[key])
            except (ValueError, RecursionError):
                raise MiniResNetError(f"{path} has metadata {key!r} that is not JSON: {shown(metadata[key])}") from None
    return {
        **described,
        "weights": {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
        "mean": tensors["mean"],
        "std": tensors["std"],
    }


# The first bytes of the image formats people most often give where a model goes (predict's order).
IMAGE_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF"}
IMAGE_SIGNATURES |= {b"II*\0": "TIFF", b"MM\0*": "TIFF"}


def foreign_kind(path: Path) -> str | None:
    """What a file that is no model file looks like, from its first bytes: "JSON", "text" or "a
    JPEG image" (PNG, GIF, TIFF, WebP); None for anything else. Every model file is binary, and
    starts as none of these."""
    with open(path, "rb") as f:
        start = f.read(4096)
    image = next((fmt for magic, fmt in IMAGE_SIGNATURES.items() if start.startswith(magic)), None)
    if image or (start[:4] == b"RIFF" and start[8:12] == b"WEBP"):
        return f"a {image or 'WebP'} image"
    try:  # incrementally, so that a character cut in two at the end of `start` is no error
        text = codecs.getincrementaldecoder("utf-8")().decode(start).removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None
    if not text or not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    return "JSON" if text.lstrip().startswith(("{", "[")) else "text"


def read_model(source: str | Path) -> dict:
    """A model's arch, weights, classes, image size, mean and std from a checkpoint, a safetensors
    export or a shipped model's name (a file of that name wins)."""
    path = Path(source)
    if path.is_file():
        kind = foreign_kind(path)
        if kind:
            raise MiniResNetError(
                f"{path} is not a model file: it looks like {kind}; give a checkpoint (.pt) from `miniresnet train`, "
                "a safetensors export (`miniresnet export --format safetensors`) or a shipped model's name "
                "(`miniresnet models` lists them)" + (" before the images" if kind.endswith("image") else "")
            )
        return read_exported_model(path) if looks_like_safetensors(path) else load_checkpoint(path)
    if path.is_dir():
        raise MiniResNetError(f"{path} is a directory; name a checkpoint in it (such as {path / 'last.pt'})")
    if path.suffix or len(path.parts) > 1:  # a path, not a name: say what is missing
        raise MiniResNetError(f"checkpoint {path} does not exist")
    return read_exported_model(shipped_weights(str(source)))


def model_file_sha256(source: str | Path) -> str:
    """The sha256 of the file `read_model(source)` reads: the file itself, or a shipped model's."""
    path = Path(source)
    return sha256_of(path if path.is_file() else shipped_weights(str(source)))


def load_model(source: str | Path, device: str | torch.device = "cpu") -> MiniResNet:
    """A trained model, in eval mode, in one line, from a checkpoint written by `miniresnet train`,
    a safetensors file written by `miniresnet export`, or a shipped model's name ("best", "best-jpeg", "seed").
    It carries `classes`, `image_size`, the input normalisation (`mean`, `std`, [0, 1] scale) and
    the `temperature` its logits are divided by before the softmax (1: not calibrated)."""
    return model_from_checkpoint(read_model(source), source).to(device).eval()
