"""Several processes (torchrun, gloo on CPU) compute what one process computes.

Why the tolerances are not bit-level: the sums across processes add in another order, and a
batch of 10 runs other convolution kernels than a batch of 20, whose float32 rounding depends on
the CPU (on some, a first-layer weight gradient is 0.25% of its largest entry away from float64).
So one step's gradients are compared in float64 on both sides, where the arithmetic is the same
to ~1e-12 on any CPU, and the end-to-end runs in float64 too (`--precision fp64`): training on
tiny data is chaotic (a 1e-7 nudge grows to ~1e-3 within 3 SGD steps), but from float64's 1e-16
it stays far below the tolerances (measured: 4e-16 relative after 10 steps).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from conftest import make_dataset
from miniresnet.checkpoint import load_checkpoint, load_model
from miniresnet.distributed import Distributed, sync_batchnorm
from miniresnet.loader import BatchLoader
from miniresnet.model import MiniResNet


def _gradients_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (20,))
    torch.manual_seed(1)
    net = sync_batchnorm(MiniResNet().double())
    ddp = DistributedDataParallel(net)  # held: a temporary wrapper would take its gradient hooks with it
    F.cross_entropy(ddp(x[rank::world]), y[rank::world]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in net.named_parameters()}, out)
    dist.barrier()  # gloo can abort a process that tears down while its peer is still busy
    dist.destroy_process_group()


def test_two_processes_compute_one_process_gradients(tmp_path):
    mp.spawn(_gradients_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "g.pt")), nprocs=2)
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (20,))
    torch.manual_seed(1)
    single = MiniResNet().double()
    F.cross_entropy(single(x), y).backward()
    shared = torch.load(tmp_path / "g.pt")
    for name, p in single.named_parameters():
        assert (shared[name] - p.grad).abs().max() <= 1e-10 * p.grad.abs().max() + 1e-15, name


def test_shards_cover_everything_once():
    for n in (0, 1, 7, 100, 10_000):
        for world in (1, 2, 3, 8):
            shards = [Distributed(rank=r, world_size=world).shard(n) for r in range(world)]
            assert sum((list(range(n))[s] for s in shards), []) == list(range(n))


@pytest.mark.parametrize("n,left_out", [(23, 1), (21, 1), (20, 0)])
def test_every_process_takes_an_equal_share_of_every_step(n, left_out):
    """Batches of 10 for 2 processes: a last batch of 3 is cut to 2 (one image each), a last batch
    of 1 is left out; the images left out are other ones each epoch. One process takes them all."""
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)

    def steps(rank: int, world: int, epoch: int) -> list[torch.Tensor]:
        images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
        loader = BatchLoader(images, torch.arange(n), 10, mean, std, shuffle=True, rank=rank, world_size=world)
        loader.set_epoch(epoch)
        assert loader.left_out == (left_out if world == 2 else 0)
        return [labels for _, labels in loader]

    left_out_by_epoch = []
    for epoch in range(4):
        one, (first, second) = steps(0, 1, epoch), (steps(rank, 2, epoch) for rank in (0, 1))
        assert sum(len(labels) for labels in one) == n
        assert len(first) == len(second) and all(len(a) == len(b) > 0 for a, b in zip(first, second, strict=True))
        for whole, a, b in zip(one, first, second, strict=False):  # each step's shares are the batch one process sees
            assert set(a.tolist()) | set(b.tolist()) <= set(whole.tolist()) and not set(a.tolist()) & set(b.tolist())
        taken = torch.cat(first + second).tolist()
        assert len(taken) == n - left_out
        left_out_by_epoch.append(frozenset(range(n)) - set(taken))
    assert len(set(left_out_by_epoch)) > 1 if left_out else left_out_by_epoch == [frozenset()] * 4


def torchrun(nproc: int, *args: str, check: bool = True, popen: bool = False):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "miniresnet",
        *args,
    ]
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check and result.returncode:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "20",
        "--optimizer",
        "sgd",
        "--momentum",
        "0.9",
        "--no-verify-data",
        "--no-download",
        "--quiet",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--eval-batch-size",
        "50",
        "--sync-bn",
        "--precision",
        "fp64",
        *extra,
    ]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_match_one(tiny_data, tmp_path):
    """10 SGD steps in float64: two processes train what one trains, to float64's rounding (~1e-15)."""
    two = torchrun(2, *train_args(tiny_data, tmp_path / "two", "--epochs", "1", "--lr", "0.002"))
    one = train_args(tiny_data, tmp_path / "one", "--epochs", "1", "--lr", "0.002")
    subprocess.run([sys.executable, "-m", "miniresnet", *one], capture_output=True, text=True, check=True)
    assert len(two.stdout.strip().splitlines()) == 1  # one summary line, from process 0
    (a,), (b,) = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("train_loss", "test_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-9), key
    assert a["test_acc"] == b["test_acc"]
    assert json.loads((tmp_path / "two" / "test_eval.json").read_text())["n"] == 100  # every test image once
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]["processes"] == 2
    model = load_model(tmp_path / "two" / "last.pt")  # a 2-process checkpoint is a plain model
    assert type(model.features[0][1]) is torch.nn.BatchNorm2d


def terminate_after_epoch(process: subprocess.Popen, run: Path, epoch: int) -> int:
    """SIGTERM once the run's checkpoint is past `epoch`; returns the epoch it stopped after."""
    deadline = time.monotonic() + 180
    while not (run / "last.pt").exists() or load_checkpoint(run / "last.pt")["epoch"] <= epoch:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on; the processes agree on a step and save
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0 and "--resume" in err, err[-3000:]
    return load_checkpoint(run / "last.pt")["epoch"]


def test_resume_across_process_counts(tiny_data, tmp_path):
    """Stopped with 2 processes, resumed with 1 and stopped again, resumed with 2 to the end."""
    run = tmp_path / "run"
    first = terminate_after_epoch(
        torchrun(2, *train_args(tiny_data, run, "--epochs", "30", "--lr", "0.01"), popen=True), run, 0
    )
    assert 1 <= first < 30
    resume = ["train", "--resume", str(run), "--quiet", "--threads", "1"]
    single = subprocess.Popen(
        [sys.executable, "-m", "miniresnet", *resume], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    second = terminate_after_epoch(single, run, first)
    assert first < second < 30
    torchrun(2, *resume)
    history = metrics(run)
    assert [m["epoch"] for m in history] == list(range(1, 31))
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_torchrun_with_a_last_batch_smaller_than_the_processes(tiny_data, tmp_path):
    """21 training images in batches of 20 for 2 processes: the last batch's one image cannot be
    shared, so it is left out (said once) rather than leaving one process an empty batch (NaN)."""
    run = torchrun(2, *train_args(tiny_data, tmp_path / "run", "--epochs", "1", "--val-split", "179"))
    assert run.stderr.count("each epoch leaves out 1 of its 21 training images") == 1
    (record,) = metrics(tmp_path / "run")
    assert torch.isfinite(torch.tensor(record["train_loss"])) and 0 <= record["val_acc"] <= 1


def test_torchrun_with_eval_sets_smaller_than_the_processes(tmp_path):
    """A test set and a validation split of one image each: the second process's shards are empty."""
    data = make_dataset(tmp_path / "data", test_size=1)
    torchrun(2, *train_args(data, tmp_path / "run", "--epochs", "1", "--val-split", "1", "--batch-size", "100"))
    assert json.loads((tmp_path / "run" / "test_eval.json").read_text())["n"] == 1
    (record,) = metrics(tmp_path / "run")
    assert record["test_acc"] in (0.0, 1.0) and record["val_acc"] in (0.0, 1.0)


@pytest.mark.parametrize(("args", "code"), [(["models"], 0), (["predict", "best", "no-such-image.png"], 1)])
def test_a_torchrun_process_exits_with_its_status_and_its_output(args, code):
    """A process torchrun started leaves without Python's teardown (gloo's threads could abort it
    there, after its work is done): its exit status and everything it printed still come out."""
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # what a lost flush would lose
    command = [sys.executable, "-m", "miniresnet", *args]
    run = subprocess.run(command, capture_output=True, text=True, env={**buffered, "WORLD_SIZE": "2"})
    alone = subprocess.run(command, capture_output=True, text=True, env=buffered)
    assert run.returncode == alone.returncode == code
    assert (run.stdout, run.stderr) == (alone.stdout, alone.stderr) and (run.stdout or run.stderr)
