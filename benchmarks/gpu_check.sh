#!/usr/bin/env bash
# The GPU checks, as one command for a machine with a CUDA GPU. From the repo root:
#
#     bash benchmarks/gpu_check.sh [RESULTS_DIR] [CIFAR10_DIR]   (default benchmarks/results/gpu)
#
# It needs a python3 with a CUDA build of PyTorch, tqdm and pytest; the package runs from src/.
# Most telling first, so that a run cut short still says the most:
# 1. The CUDA-only tests (among them: the recorded CUDA-graph step matches the eager one and never
#    makes the host wait inside an epoch; a graph run resumes where an unbroken one ends). 2. `bench`
#    on the GPU at the presets' batch sizes (seed 100, fast 256, and 512), each as a recorded graph
#    and eagerly (--no-cuda-graph), in fp32, bf16 autocast, bf16 weights (BatchNorm in fp32) and fp16
#    (fp16, with its loss scaler, is always eager); bf16 compiled once. 3. With CIFAR-10 (CIFAR10_DIR, or
#    $MINIRESNET_CIFAR10): the `seed`, `quick` and `fast` presets end to end on the GPU, seed 0, with
#    their wall times, and `fast` again with bf16 weights (their results files are copied into
#    RESULTS_DIR). 4. The whole test suite: every test that trains with device "auto" (most of
#    tests/test_train.py) trains on the GPU here. Everything it prints is also saved in RESULTS_DIR.
set -uo pipefail
results=${1:-benchmarks/results/gpu}
mkdir -p "$results"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "PyTorch sees no CUDA GPU"
print("torch", torch.__version__, "on", torch.cuda.get_device_name())' | tee "$results/device.txt" || exit 1
failed=0
run_tests() { python3 -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee -a "$results/pytest.log" || failed=1; }
run_tests -k "cuda or gpu or graph"
bench() { python3 -m miniresnet bench --device cuda --json "$@" | tee -a "$results/bench.jsonl" || failed=1; }
for spec in "seed 100" "fast 256" "fast 512"; do
    set -- $spec
    bench --preset "$1" --batch-size "$2" --precision all
    bench --preset "$1" --batch-size "$2" --precision all --no-cuda-graph
done
bench --preset fast --batch-size 256 --precision bf16 --compile
data=${2:-${MINIRESNET_CIFAR10:-}}
if [ -n "$data" ]; then
    for preset in seed quick fast; do
        python3 benchmarks/preset_runs.py --preset "$preset" --seeds 0 --data-dir "$data" --name "gpu-$preset" \
            -- --device cuda 2>&1 | tee -a "$results/presets.log" || failed=1
        cp "benchmarks/results/gpu-$preset.json" "$results/" 2>/dev/null
    done
    # The precision study's third arm at equal recipe: the weights themselves in bf16, BatchNorm in fp32.
    python3 benchmarks/preset_runs.py --preset fast --seeds 0 --data-dir "$data" --name gpu-fast-bf16-weights \
        -- --device cuda --precision bf16-weights 2>&1 | tee -a "$results/presets.log" || failed=1
    cp benchmarks/results/gpu-fast-bf16-weights.json "$results/" 2>/dev/null
else
    echo "no CIFAR-10 given: the end-to-end preset runs are skipped" | tee -a "$results/presets.log"
fi
run_tests
exit $failed
