"""Faults a long run meets: killed processes, signals, a full disk, and readers fed random bytes.
Nothing is lost beyond the last checkpoint, and nothing corrupt is ever left behind."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import synthetic_images, tiny_config, write_binary_batch, write_python_batch
from miniresnet.checkpoint import load_checkpoint
from miniresnet.data import read_binary_batch, read_python_batch
from miniresnet.errors import MiniResNetError
from miniresnet.train import train

TIMED_FIELDS = ("seconds", "elapsed", "images_per_sec")


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "miniresnet",
        "train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "20",
        "--lr",
        "0.003",
        "--no-verify-data",
        "--no-download",
        "--quiet",
        "--device",
        "cpu",
        "--eval-batch-size",
        "100",
        "--threads",
        "1",
        *extra,
    ]


def untimed(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED_FIELDS} for line in lines]


def wait_for_progress(run_dir: Path, process: subprocess.Popen, after: float) -> None:
    """Until a checkpoint exists (so a kill has something to resume from), then `after` seconds more."""
    deadline = time.monotonic() + 120
    while not (run_dir / "last.pt").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    time.sleep(after)


def test_sigkill_at_random_moments_loses_nothing_but_the_last_steps(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(train_command(tiny_data, reference), check=True, capture_output=True)

    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    command = train_command(tiny_data, run_dir, "--checkpoint-every", "1")
    for attempt in range(4):
        if attempt:
            command = [*command[:4], "--resume", str(run_dir), "--no-verify-data", "--quiet", "--threads", "1"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_progress(run_dir, process, after=rng.uniform(0.0, 1.5))
        if process.poll() is not None:  # finished before this kill point: nothing left to resume
            assert process.returncode == 0, process.stderr.read()
            break
        process.kill()
        process.wait()
        kills += 1
        state = load_checkpoint(run_dir / "last.pt")  # never torn: loads, and says where it was
        assert 0 <= state["epoch"] <= 3 and state["tally"]["step"] <= 10
    else:
        resume = [*command[:4], "--resume", str(run_dir), "--no-verify-data", "--quiet", "--threads", "1"]
        subprocess.run(resume, check=True, capture_output=True)
    assert kills >= 1
    assert untimed(run_dir) == untimed(reference)
    assert not list(run_dir.glob(".*.tmp"))  # a save cut off by a kill leaves a temporary file; resume removes it


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_and_say_how_to_resume(tiny_data, tmp_path, signum):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        train_command(tiny_data, run_dir, "--epochs", "30"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_progress(run_dir, process, after=0.3)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    assert f"miniresnet train --resume {run_dir}" in err and "Traceback" not in err
    state = load_checkpoint(run_dir / "last.pt")
    assert state["epoch"] < 30
    metrics = untimed(run_dir)
    assert len(metrics) == state["epoch"]


def test_full_disk_mid_run_stops_cleanly_and_the_run_resumes(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, eval_batch_size=100)
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(MiniResNetError, match="No space left on device; the previous last.pt is unchanged"):
        train(cfg)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    summary = train(cfg, resume=True)
    assert summary["epochs"] == 3 and len(untimed(out)) == 3


WRITE_PAST_A_SIZE_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from miniresnet.checkpoint import save_checkpoint
from miniresnet.errors import MiniResNetError
from miniresnet.folders import write_cache

out = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
big = {"weights": torch.zeros(200_000)}  # 800 kB
save_checkpoint({"small": 1}, out / "last.pt")
try:
    save_checkpoint(big, out / "last.pt")
except MiniResNetError as e:
    print("checkpoint:", e)
print("cache:", write_cache(out / "cache.pt", big))
"""


def test_a_write_that_fails_partway_is_a_clear_error_and_keeps_the_previous_file(tmp_path):
    """A real failing write (a file-size limit makes the kernel refuse it, as a full disk does), not a
    mocked one: torch.save's own file writer reports it as a RuntimeError, which no handler caught."""
    done = subprocess.run(
        [sys.executable, "-c", WRITE_PAST_A_SIZE_LIMIT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "checkpoint: could not save the checkpoint" in done.stdout, done.stdout
    assert "File too large; the previous last.pt is unchanged" in done.stdout
    assert "cache: not cached" in done.stdout and "File too large" in done.stdout.split("cache:")[1]
    assert load_checkpoint(tmp_path / "last.pt")["small"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def valid_file(tmp_path: Path, write) -> bytes:
    write(tmp_path / "valid", *synthetic_images(3))
    return (tmp_path / "valid").read_bytes()


def mutated(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[: max(0, len(out) - cut)])


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
READERS = pytest.mark.parametrize(
    "reader, write", [(read_binary_batch, write_binary_batch), (read_python_batch, write_python_batch)]
)


def check_reader(reader, path: Path, content: bytes) -> None:
    """A reader either returns well-formed data or raises the project's own error; nothing else."""
    path.write_bytes(content)
    try:
        images, labels = reader(path)
    except MiniResNetError as e:
        assert str(path) in str(e)
        return
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and len(images) == len(labels)
    assert labels.min() >= 0 and labels.max() <= 9


@READERS
@FUZZ
@given(content=st.binary(max_size=4000))
def test_reader_on_random_bytes(tmp_path, reader, write, content):
    check_reader(reader, tmp_path / "fuzz", content)


@READERS
@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8), cut=st.integers(0, 3000))
def test_reader_on_mutated_files(tmp_path, reader, write, edits, cut):
    check_reader(reader, tmp_path / "fuzz", mutated(valid_file(tmp_path, write), edits, cut))
