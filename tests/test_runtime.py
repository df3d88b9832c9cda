import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from miniresnet import runtime
from miniresnet.bench import matmul_gflops, run_bench
from miniresnet.errors import MiniResNetError


def test_available_cores_respects_affinity():
    cores = runtime.available_cores()
    assert 1 <= cores <= len(runtime.os.sched_getaffinity(0))


def test_set_threads_auto_and_explicit():
    before = torch.get_num_threads()
    try:
        assert runtime.set_threads(1) == 1 == torch.get_num_threads()
        assert runtime.set_threads(0) == runtime.available_cores()
    finally:
        torch.set_num_threads(before)


def test_precision_resolution_on_cpu(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("fp32", cpu) == runtime.FP32
    assert runtime.resolve_precision("fp64", cpu) == runtime.Precision("fp64", None, torch.float64)
    assert runtime.resolve_precision("fp16", cpu) == runtime.FP32
    assert "fp16 autocast is for CUDA" in capsys.readouterr().err
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    bf16 = runtime.Precision("bf16", torch.bfloat16)
    assert runtime.resolve_precision("bf16", cpu) == bf16 == runtime.resolve_precision("auto", cpu)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == runtime.FP32
    assert capsys.readouterr().err == ""  # auto choosing fp32 is no fallback: nothing to say
    assert runtime.resolve_precision("bf16", cpu) == runtime.FP32
    assert "lacks native bf16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.resolve_precision("int8", cpu)


NATIVE_BF16 = "from miniresnet.runtime import cpu_has_native_bf16; print(cpu_has_native_bf16())"


@pytest.mark.parametrize("cap", ["AVX2", "AVX512_CORE"])
def test_native_bf16_follows_an_isa_cap(cap):
    """Capped below AVX-512-BF16, oneDNN emulates bf16 (slower than fp32), so `auto` must not pick
    it: AVX512_CORE is the case oneDNN's own bf16 check still says yes to."""
    env = {**runtime.os.environ, "ONEDNN_MAX_CPU_ISA": cap, "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run([sys.executable, "-c", NATIVE_BF16], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_describe_machine_names_the_cpu_and_its_kernels():
    machine = runtime.describe_machine(torch.device("cpu"))
    assert machine["cpu"] and machine["arch"] and machine["threads"] == torch.get_num_threads()
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["native_bf16"] == runtime.cpu_has_native_bf16()


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MiniResNetError, match="no CUDA"):
        runtime.resolve_device("cuda")


def test_bench_reports_consistent_figures():
    result = run_bench("fp32", batch_size=8, steps=2, repeats=1, device="cpu")
    assert result["train_images_per_sec"] > 0 and result["eval_images_per_sec"] > 0
    flop_per_image = 3 * 2 * 31_113_856
    assert result["train_gflops"] == pytest.approx(result["train_images_per_sec"] * flop_per_image / 1e9, rel=0.01)
    assert result["efficiency"] == pytest.approx(result["train_gflops"] / result["matmul_gflops"], abs=0.002)
    assert result["machine"] == runtime.describe_machine(torch.device("cpu"))


def test_matmul_gflops_is_positive():
    assert matmul_gflops(torch.device("cpu"), torch.float32, size=128, repeats=2) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_runs(tiny_data, tmp_path):
    from miniresnet.train import train

    cfg = tiny_config(tiny_data, tmp_path / "r", epochs=1, batch_size=50, device="cuda", precision="bf16")
    summary = train(cfg)
    assert summary["device"].startswith("cuda") and 0 <= summary["test_acc"] <= 1


PAGE_FAULTS_PER_STEP = """
import resource, sys
import torch
import torch.nn.functional as F
from miniresnet import runtime
from miniresnet.model import MiniResNet

torch.set_num_threads(2)
if sys.argv[1] == "keep":
    assert runtime.keep_freed_memory()
model = MiniResNet().to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters())
x = torch.randn(100, 3, 32, 32).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (100,))

def step():
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()

for _ in range(8):  # the heap grows to its working size
    step()
per_step = []  # the quietest of three windows of 3 steps: a stray fault elsewhere in the process is not a step's
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
print(min(per_step))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and its page-fault figures are glibc's")
def test_keeping_freed_memory_ends_the_page_faults_of_each_step():
    """Without it, glibc hands a step's freed activations back to the kernel and the next step
    faults its pages in again; with it, a step in steady state reuses the heap."""

    def faults(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], capture_output=True, text=True, check=True, timeout=120
        )
        return float(done.stdout)

    default, kept = faults("default"), faults("keep")
    assert default > 500, f"glibc's default no longer faults pages in each step ({default:.0f}); recheck the README"
    assert kept < default / 10, (kept, default)
