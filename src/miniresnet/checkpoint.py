"""Checkpoints: written atomically (a crash leaves the old file or the new one, never half of
one) and loaded with `weights_only=True`, so a checkpoint can hold tensors and plain data but
never code."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import torch

from .errors import MiniResNetError
from .model import MiniResNet

FORMAT = "miniresnet-checkpoint"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a lost mount, no permission
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
        raise MiniResNetError(f"could not save the checkpoint {path}: {e.strerror or e}; {kept}. "
                              "Free some space (or choose another --out) and resume") from None  # fmt: skip
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
        model.load_state_dict(strip_prefixes(state["model"]))
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
