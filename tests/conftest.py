"""Shared fixtures: tiny CIFAR-10 look-alikes written in both on-disk formats, and the real data
set when MINIRESNET_CIFAR10 points at it."""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import pickle
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from miniresnet.config import TrainConfig
from miniresnet.data import BIN_DIR, CLASSES, PY_DIR, TEST_FILES, TRAIN_FILES
from miniresnet.export import NormalizedModel
from miniresnet.model import MiniResNet
from miniresnet.safetensors_file import save_safetensors


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is easy to learn: each class has its own colour and stripe pattern."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    colours = np.random.default_rng(1234).integers(30, 225, size=(10, 3, 1, 1))  # the same in every file
    stripes = np.arange(32)[None, :] * (1 + np.arange(10))[:, None] // 4 % 2 * 40  # (10, 32)
    images = colours[labels] + stripes[labels][:, None, :, None] + rng.normal(0, 12, size=(n, 3, 32, 32))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_binary_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    records = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1)
    path.write_bytes(records.astype(np.uint8).tobytes())


def write_python_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    batch = {
        b"batch_label": b"synthetic",
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [b"x.png"] * len(labels),
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def make_dataset(root: Path, fmt: str = BIN_DIR, per_file: int = 40, test_size: int = 100) -> Path:
    """A data directory laid out like the real one: 5 training files and a test file."""
    batches = root / fmt
    batches.mkdir(parents=True)
    write = write_binary_batch if fmt == BIN_DIR else write_python_batch
    for i, name in enumerate(TRAIN_FILES[fmt]):
        write(batches / name, *synthetic_images(per_file, seed=i))
    write(batches / TEST_FILES[fmt][0], *synthetic_images(test_size, seed=99))
    return root


def tiny_config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """The configuration of a short run on tiny data: the one every training test starts from."""
    base = dict(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        epochs=3,
        batch_size=25,
        lr=3e-3,
        verify_data=False,
        download=False,
        quiet=True,
        eval_batch_size=64,
    )
    return TrainConfig(**{**base, **overrides})


def script_module(relative_path: str) -> ModuleType:
    """A script of the repository (`scripts/ship_model.py`, `benchmarks/...`), imported as a module:
    the scripts sit beside the package, not in it."""
    script = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(script.stem, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_like(model: MiniResNet, path: Path, classes: list[str]) -> None:
    """A model file as `miniresnet export --format safetensors` writes one (tested in test_usage)."""
    wrapped = NormalizedModel(model, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3]))
    metadata = {"format": "miniresnet", "arch": json.dumps(model.arch()), "classes": json.dumps(classes)}
    save_safetensors(wrapped.state_dict(), metadata, path)


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 for the files in `directory`; yields its base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def interrupt_training_at(monkeypatch, step: int) -> Callable[[], None]:
    """Make the next training send itself SIGINT (as Ctrl-C would) while its optimizer step `step`
    (counted from 0 over the run) is taken; returns the function that puts the real schedule back."""
    import miniresnet.train as train_module

    real = train_module.learning_rate

    def learning_rate_that_interrupts(cfg, at, steps_per_epoch):
        if at == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(cfg, at, steps_per_epoch)

    monkeypatch.setattr(train_module, "learning_rate", learning_rate_that_interrupts)
    return lambda: monkeypatch.setattr(train_module, "learning_rate", real)


def gpu_waits(steps: Iterator) -> tuple[int, list[str]]:
    """Take the remaining training steps under CUDA's sync debug mode, which warns at every operation
    that makes the host wait for the GPU: how many steps were taken, and the waits' warnings."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            taken = sum(1 for _ in steps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return taken, [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


@pytest.fixture(autouse=True, scope="session")
def cache_in_a_temporary_directory(tmp_path_factory) -> None:
    """Prepared image folders are cached under XDG_CACHE_HOME: the tests' own, never the user's."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture
def real_data() -> Path:
    path = os.environ.get("MINIRESNET_CIFAR10")
    if not path or not (Path(path) / BIN_DIR).is_dir():
        pytest.skip("real CIFAR-10 not available: set MINIRESNET_CIFAR10 to a directory holding cifar-10-batches-bin/")
    return Path(path)


__all__ = [
    "PY_DIR",
    "gpu_waits",
    "interrupt_training_at",
    "make_dataset",
    "serve_directory",
    "tiny_config",
    "synthetic_images",
    "write_binary_batch",
    "write_python_batch",
]


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """An untrained CIFAR-10 model exported as safetensors: what a server loads like any model file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("served") / "model.safetensors"
    export_like(MiniResNet().eval(), path, list(CLASSES))
    return path
