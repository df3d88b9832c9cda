"""Checkpoints: what they hold (one function says it), written atomically (a crash leaves the old
file or the new one, never half of one) and loaded with `weights_only=True`, so a checkpoint can
hold tensors and plain data but never code."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .ema import EMA
from .errors import MiniResNetError
from .files import atomic_path
from .model import MiniResNet

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
    *,
    epoch: int,
    tally: dict,
    history: list[dict],
    best_val: float,
    seconds: float,
    classes: tuple[str, ...],
    mean: torch.Tensor,
    std: torch.Tensor,
    config: dict,
    device: torch.device,
) -> dict:
    """What a checkpoint holds. To use the model: `arch`, `weights` (the EMA average when EMA is
    on), `classes`, `mean` and `std`. To continue the run exactly: the `config`, `epoch` (finished
    epochs), the optimizer's `trained_weights` (only when EMA is on: otherwise they are `weights`),
    the optimizer and EMA states, the current epoch's `tally` (its step and running sums), the
    metrics `history`, `best_val`, the `seconds` spent so far and the random number generators."""
    return {
        "arch": model.arch(),
        "weights": (ema.model if ema else model).state_dict(),
        "classes": list(classes),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "config": config,
        "epoch": epoch,
        "trained_weights": model.state_dict() if ema else None,
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema else None,
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
    state: dict, model: MiniResNet, optimizer: torch.optim.Optimizer, ema: EMA | None, device: torch.device
) -> None:
    """Put a `training_checkpoint`'s weights, optimizer, EMA and random state back in place."""
    model.load_state_dict(state["trained_weights"] if ema else state["weights"])
    optimizer.load_state_dict(state["optimizer"])
    if ema:
        ema.load_state_dict(state["ema"])
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> MiniResNet:
    """A trained model, in eval mode, from a checkpoint, in one line. It carries `classes` and
    the input normalisation (`mean`, `std` on the [0, 1] scale) as attributes."""
    state = load_checkpoint(path)
    model = model_from_checkpoint(state).to(device).eval()
    model.classes = tuple(state["classes"])
    model.mean = torch.tensor(state["mean"])
    model.std = torch.tensor(state["std"])
    return model
