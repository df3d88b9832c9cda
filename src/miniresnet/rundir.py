"""The run directory and the process around a training run: opening the directory (fresh or to
resume), the files written beside the checkpoints, the signals that stop a run cleanly, TensorBoard
and the plots."""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import MiniResNetError
from .files import write_text_atomically
from .plots import NO_MATPLOTLIB, have_matplotlib, plot_curves, plot_evaluation
from .runtime import log

# Everything a run writes, removed when --overwrite starts a fresh run in the same directory
# (config.json is replaced), and the folder --tensorboard writes into.
RUN_FILES = (
    "metrics.jsonl",
    "last.pt",
    "best.pt",
    "summary.json",
    "test_eval.json",
    "report.html",
    "curves.png",
    "confusion.png",
    "misclassified.png",
    "reliability.png",
)
TENSORBOARD_DIR = "tensorboard"


def open_run_dir(out: Path, epochs: int, resume: bool, overwrite: bool, is_main: bool = True) -> dict | None:
    """A fresh run goes into a new or empty directory, or replaces an earlier run with `overwrite`;
    any other directory is refused, so nothing of anyone else's is overwritten or deleted. The
    directory is made, or the earlier run's files removed, only once the new run has set itself up
    (start_run_dir): a run that cannot start (no data, a bad teacher) changes nothing. A resumed
    run needs its checkpoint, which is returned. Only the main process changes files."""
    if resume:
        if not (out / "last.pt").is_file():
            raise MiniResNetError(f"there is no run to resume in {out}: {out / 'last.pt'} does not exist")
        for leftover in out.glob(".*.tmp") if is_main else ():  # from a save cut off by a kill
            leftover.unlink(missing_ok=True)
        state = load_checkpoint(out / "last.pt")
        if state.get("epoch") == epochs and (out / "summary.json").exists():  # written last of all
            raise MiniResNetError(f"the run in {out} has already finished all {epochs} epochs (see summary.json)")
        return state
    is_run = (out / "config.json").is_file()
    if out.exists() and not out.is_dir():
        raise MiniResNetError(f"--out {out} is a file, not a directory")
    if not is_run and out.is_dir() and any(out.iterdir()):  # someone else's files: never ours to replace
        raise MiniResNetError(
            f"{out} is not empty and holds no run (no config.json); a run is written only into a new or empty "
            "directory, or over an earlier run with --overwrite: choose another --out"
        )
    if is_run and not overwrite:
        raise MiniResNetError(
            f"{out} already holds a run; choose another --out, pass --resume {out} to continue it, "
            "or --overwrite to replace it"
        )
    return None


def start_run_dir(out: Path) -> None:
    """Makes `out` for a fresh run, or removes what an earlier run wrote in it (see open_run_dir),
    so that none of it is taken for the new run's."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in RUN_FILES:
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)


def write_json(path: Path, value, indent: int | None = 2) -> None:
    write_text_atomically(path, json.dumps(value, indent=indent) + "\n")


def write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl: one line per finished epoch (rewritten whole, so a resume drops nothing)."""
    write_text_atomically(out / "metrics.jsonl", "".join(json.dumps(record) + "\n" for record in history))


class StopSignals:
    """While active, SIGINT and SIGTERM only set `received`, which the loop checks between steps,
    so the weights are never saved half-updated. A second SIGINT stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(MiniResNetError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved. Exit status 128 + the signal number."""

    def __init__(self, signum: int, out: Path, epochs_done: int, step: int) -> None:
        where = f"epoch {epochs_done}" + (f" and step {step} of epoch {epochs_done + 1}" if step else "")
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after {where}; checkpoint {out / 'last.pt'}. "
            f"Continue with: miniresnet train --resume {out}"
        )
        self.exit_code = 128 + signum


def tensorboard_writer(out: Path):
    """A TensorBoard SummaryWriter logging into out/tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MiniResNetError(
            "--tensorboard needs the tensorboard package: pip install 'miniresnet[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))


def write_plots(
    out: Path,
    history: list[dict],
    images: torch.Tensor,
    labels: torch.Tensor,
    test_logits: torch.Tensor,
    test_result: dict,
    classes: tuple[str, ...],
) -> None:
    """curves.png, confusion.png and misclassified.png in the run directory, when matplotlib is there."""
    if not have_matplotlib():
        log(f"no plots written: {NO_MATPLOTLIB}")
        return
    plot_curves(history, out / "curves.png")
    plot_evaluation(images, labels, test_logits, test_result, classes, out, "test set")
