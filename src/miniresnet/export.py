"""`miniresnet export`: a trained model as ONNX, TorchScript or safetensors, with its input
normalisation inside, checked against the PyTorch model on real test images before the file is
put in place.

Every exported model takes float32 RGB images, shape (N, 3, S, S) with S the model's image size
(32 for CIFAR), scaled to [0, 1] (uint8 pixels divided by 255), and returns logits (N, classes) in
the order of the checkpoint's classes. Each file carries the class names and the architecture:
safetensors in its metadata, ONNX in its metadata_props, TorchScript as the extra file
`miniresnet.json`.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_model
from .errors import MiniResNetError
from .files import atomic_path, os_error_of_torch_writer
from .model import MiniResNet
from .safetensors_file import save_safetensors

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-3  # max abs logit difference accepted (float32 kernels differ between runtimes)


class NormalizedModel(nn.Module):
    """A MiniResNet that takes [0, 1] images: the training set's per-channel mean and std are buffers."""

    def __init__(self, model: MiniResNet, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


def _require(module: str, extra: str = "export"):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise MiniResNetError(f"this export needs {module}: pip install 'miniresnet[{extra}]'") from None


def describe(model: MiniResNet) -> dict[str, str]:
    """The strings each exported file carries about its model."""
    size = model.image_size
    return {
        "format": "miniresnet",
        "arch": json.dumps(model.arch()),
        "classes": json.dumps(list(model.classes)),
        "image_size": str(size),
        "temperature": json.dumps(getattr(model, "temperature", 1.0)),
        "input": f"float32 RGB (N, 3, {size}, {size}) in [0, 1]; the normalisation is inside the model",
        "output": "logits; calibrated probabilities are softmax(logits / temperature)",
    }


def _write_onnx(wrapped: nn.Module, example: torch.Tensor, path: Path, about: dict[str, str]):
    onnx = _require("onnx")
    _require("onnxscript")
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter's internal notices (deprecations, "torchvision is not installed") are not the user's to fix.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                wrapped,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                verbose=False,
                external_data=False,
            )  # one self-contained file: the weights are ~1 MB
    finally:
        onnx_log.setLevel(level)
    written = onnx.load(str(path))
    onnx.helper.set_model_props(written, about)
    onnx.save(written, str(path))

    def run(x: torch.Tensor) -> torch.Tensor | None:
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])

    return run


def _write_torchscript(wrapped: nn.Module, path: Path, about: dict[str, str]):
    # PyTorch deprecates TorchScript in favour of torch.export, but it is still what C++ and
    # mobile runtimes load; the warning says nothing the user can act on here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with open(path, "wb") as f, os_error_of_torch_writer():  # a full disk: an OSError, as for any file
            torch.jit.save(torch.jit.script(wrapped), f, _extra_files={"miniresnet.json": json.dumps(about)})

    def run(x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path)).eval()(x)

    return run


def _write_safetensors(wrapped: NormalizedModel, path: Path, about: dict[str, str]):
    save_safetensors(wrapped.state_dict(), about, path)

    def run(x: torch.Tensor) -> torch.Tensor:
        rebuilt = load_model(path)
        return NormalizedModel(rebuilt, rebuilt.mean, rebuilt.std).eval()(x)

    return run


@torch.no_grad()
def export(model: MiniResNet, fmt: str, out: str | Path, images: torch.Tensor) -> dict:
    """Write `model` (a `load_model` result) to `out` in `fmt` and compare its logits with PyTorch's
    on `images` (uint8, N x 3 x S x S). The file is written beside `out` and renamed into place only
    when the check passes."""
    if fmt not in FORMATS:
        raise MiniResNetError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise MiniResNetError(f"--out {out} is a directory; name the file to write, such as {out / ('model.' + fmt)}")
    try:
        return _export_checked(model, fmt, out, images)
    except OSError as e:  # a folder that cannot be made or written, a full disk
        raise MiniResNetError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None


def _export_checked(model: MiniResNet, fmt: str, out: Path, images: torch.Tensor) -> dict:
    wrapped = NormalizedModel(model, model.mean, model.std).eval()
    x = images.float() / 255
    expected = wrapped(x)
    with atomic_path(out) as tmp:  # renamed into place only if the check below passes
        about = describe(model)
        if fmt == "onnx":
            run = _write_onnx(wrapped, x[:2], tmp, about)
        elif fmt == "torchscript":
            run = _write_torchscript(wrapped, tmp, about)
        else:
            run = _write_safetensors(wrapped, tmp, about)
        got = run(x)
        if got is None:
            checked_with = "onnx.checker only (install onnxruntime for a numerical check)"
            _require("onnx").checker.check_model(str(tmp))
            max_diff, agreement = None, None
        else:
            checked_with = {
                "onnx": "onnxruntime",
                "torchscript": "torch.jit.load",
                "safetensors": "load_model on the file",
            }[fmt]
            max_diff = (got - expected).abs().max().item()
            agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
            if not max_diff <= TOLERANCE:
                raise MiniResNetError(
                    f"the exported {fmt} model disagrees with PyTorch: max abs logit difference "
                    f"{max_diff:.3g} > {TOLERANCE}; nothing was written"
                )
    return {
        "format": fmt,
        "path": str(out),
        "bytes": out.stat().st_size,
        "checked_on_images": len(images),
        "checked_with": checked_with,
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agreement,
        "input": about["input"],
        "classes": list(model.classes),
    }
