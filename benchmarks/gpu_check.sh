#!/usr/bin/env bash
# The prepared GPU check: build with CUDA, run the CUDA tests, run the GPU
# benchmark, and with NCU=1 read the tensor-core kernels' counters with Nsight
# Compute where it works, and with NEIGHBORHOOD=1 time NATTEN's 7 x 7
# neighbourhood against FlexAttention; everything lands in $OUT (default
# benchmarks/gpu_results).
# Needs an NVIDIA GPU, nvcc and a CUDA build of torch; downloads nothing.
# CUDA objects already in build/temp.*/cuda/ and newer than every source are
# linked as they are (setup.py), so objects compiled elsewhere by the same
# nvcc can be brought along to save the device the nvcc step; the C sources
# still compile here (about 100 s on an H200 host).
# Budget: about 8 minutes on an H100/H200.
set -u
OUT=${OUT:-benchmarks/gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; nvcc --version | tail -2; } > "$OUT/environment.txt" 2>&1
stamp "building (sm_90 only, to save time)"
SPARSE_ATTENTION_CUDA=1 SPARSE_ATTENTION_CUDA_ARCHS="${SPARSE_ATTENTION_CUDA_ARCHS:-90}" \
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { stamp "build failed"; tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import sparse_attention._C as C; print('WITH_CUDA', C.WITH_CUDA, 'devices', C.cuda_device_count())"

stamp "CUDA tests"
# two runs, so that a fault in one kernel file cannot hide the other's results
# (SUITES narrows them to the files a change touches)
for suite in ${SUITES:-tests/test_cuda.py tests/test_cuda_tiled.py}; do
  timeout 240 $PY -m pytest -q --tb=short -p no:cacheprovider "$suite" >> "$OUT/cuda_tests.log" 2>&1
  echo "== $suite rc $?" | tee -a "$OUT/cuda_tests.log"
  grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -1
done
stamp "benchmark"
timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/gpu_bench.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
if [ "${NEIGHBORHOOD:-0}" = "1" ]; then
  stamp "NATTEN's neighbourhood against FlexAttention (NEIGHBORHOOD=1; about a minute)"
  timeout ${NEIGHBORHOOD_TIMEOUT:-120} $PY benchmarks/gpu_bench.py --out "$OUT/neighborhood" --patterns neighborhood \
    --flex-patterns neighborhood --host-sides "" --profile-sides "" --segment-keys "" 2>&1 | tee "$OUT/neighborhood.log"
fi
stamp "module training step (bias, dropout, statistics), tensor-core backward extras on and off"
timeout ${MODULE_TIMEOUT:-90} $PY benchmarks/gpu_module_step.py --out "$OUT" 2>&1 | tee "$OUT/module_step.log"
stamp "kernel counters (ncu; fails where the runtime hides the counters)"
if [ "${NCU:-0}" != "1" ]; then
  echo "ncu not run (NCU=1 runs it; about two minutes)"
elif command -v ncu > /dev/null; then
  timeout ${NCU_TIMEOUT:-120} ncu --clock-control none -k regex:forward_ --launch-count 10 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats \
    $PY benchmarks/gpu_kernel_profile.py 128 axial,longformer,block > "$OUT/ncu.txt" 2>&1
  echo "ncu rc $?"; grep -E "forward_|Duration|Achieved Occupancy|Registers Per|Compute \(SM\) Throughput|Memory Throughput|Issued Ipc|No Eligible" "$OUT/ncu.txt" | head -60
else
  echo "no ncu on PATH"
fi
stamp "done"
