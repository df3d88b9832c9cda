"""Checkpoints: what they hold (one function says it), written atomically (a crash leaves the old
file or the new one, never half of one) and loaded with `weights_only=True`, so a checkpoint can
hold tensors and plain data but never code."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from .ema import EMA
from .errors import MiniResNetError
from .files import atomic_path
from .model import MiniResNet
from .pretrained import shipped_weights
from .safetensors_file import load_safetensors, looks_like_safetensors

FORMAT = "miniresnet-checkpoint"
RENAMED_KEYS = {"model": "weights", "trained_model": "trained_weights"}


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write atomically: a crash leaves the previous checkpoint or this one."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save({"format": FORMAT, **state}, tmp)
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
    config: dict,
    device: torch.device,
) -> dict:
    """What a checkpoint holds. To use the model: `arch`, `weights` (the EMA average when EMA is
    on), `classes`, `image_size` (the side images are prepared at), `mean` and `std`. To continue
    the run exactly: the `config`, `epoch` (finished epochs), the optimizer's `trained_weights`
    (only when EMA is on: otherwise they are `weights`), the optimizer, EMA and fp16 loss-scaler
    states, the current
    epoch's `tally` (its step and running sums), the metrics `history`, `best_val`, the `seconds`
    spent so far and the random number generators."""
    return {
        "arch": model.arch(),
        "weights": (ema.model if ema else model).state_dict(),
        "classes": list(classes),
        "image_size": image_size,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "config": config,
        "epoch": epoch,
        "trained_weights": model.state_dict() if ema else None,
        "optimizer": optimizer.state_dict(),
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
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MiniResNetError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or not a PyTorch file): {first_line}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MiniResNetError(f"{path} is a PyTorch file but not a miniresnet checkpoint")
    for old, new in RENAMED_KEYS.items():  # checkpoints written before the rename still load
        if old in state and new not in state:
            state[new] = state.pop(old)
    return state


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the 'module.' (DistributedDataParallel) and '_orig_mod.' (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def model_from_checkpoint(state: dict) -> MiniResNet:
    arch = state["arch"]
    model = MiniResNet(tuple(arch["widths"]), arch["blocks_per_stage"], arch["num_classes"])
    try:
        model.load_state_dict(strip_prefixes(state["weights"]))
    except RuntimeError as e:
        raise MiniResNetError(f"the checkpoint's weights do not fit a MiniResNet{tuple(arch['widths'])}: {e}") from None
    return model


def read_exported_model(path: str | Path) -> dict:
    """What `load_model` needs (arch, weights, classes, mean, std) from a `miniresnet export
    --format safetensors` file: a normalised model's tensors plus the architecture and classes."""
    tensors, metadata = load_safetensors(path)
    if metadata.get("format") != "miniresnet":
        raise MiniResNetError(f"{path} is a safetensors file but not a miniresnet model (no miniresnet metadata)")
    try:
        return {
            "arch": json.loads(metadata["arch"]),
            "weights": {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
            "classes": json.loads(metadata["classes"]),
            "image_size": int(metadata.get("image_size", 32)),
            "mean": tensors["mean"].flatten().tolist(),
            "std": tensors["std"].flatten().tolist(),
        }
    except (KeyError, ValueError) as e:
        raise MiniResNetError(f"{path} is a miniresnet safetensors file without its {e}") from None


def read_model(source: str | Path) -> dict:
    """A model's arch, weights, classes, mean and std from a checkpoint, a safetensors export or a
    shipped model's name (a file of that name wins)."""
    path = Path(source)
    if path.is_file():
        return read_exported_model(path) if looks_like_safetensors(path) else load_checkpoint(path)
    if path.is_dir():
        raise MiniResNetError(f"{path} is a directory; name a checkpoint in it (such as {path / 'last.pt'})")
    if path.suffix or len(path.parts) > 1:  # a path, not a name: say what is missing
        raise MiniResNetError(f"checkpoint {path} does not exist")
    return read_exported_model(shipped_weights(str(source)))


def load_model(source: str | Path, device: str | torch.device = "cpu") -> MiniResNet:
    """A trained model, in eval mode, in one line, from a checkpoint written by `miniresnet train`,
    a safetensors file written by `miniresnet export`, or a shipped model's name ("best", "seed").
    It carries `classes`, `image_size` and the input normalisation (`mean`, `std`, [0, 1] scale)."""
    state = read_model(source)
    model = model_from_checkpoint(state).to(device).eval()
    model.classes = tuple(state["classes"])
    model.image_size = int(state.get("image_size", 32))  # checkpoints before image folders: CIFAR's 32
    model.mean = torch.tensor(state["mean"])
    model.std = torch.tensor(state["std"])
    return model
