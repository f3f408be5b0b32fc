#!/usr/bin/env bash
# One call on a lent GPU machine: install accordion (no network there), run the GPU tests, then benchmarks.
# Usage: bash bench/gpu_suite.sh [tests] [offline] [kernels] [serve] ...   (default: tests offline kernels)
# MIXED_ARGS="--modes static" passes extra arguments to bench/mixed_workload.py.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
# The device copy has no (or stale) git metadata: the caller passes the commit (ACCORDION_COMMIT=$(git rev-parse --short HEAD) bash ...).
export TOKENIZERS_PARALLELISM=false ACCORDION_COMMIT=${ACCORDION_COMMIT:?pass ACCORDION_COMMIT=$(git rev-parse --short HEAD): the device copy has stale git metadata}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Wheels the image lacks (.whl, carried): ../shared/tools/build-gpu-wheels grpcio-health-checking==1.84.0 \
#   grpcio-reflection==1.84.0 prometheus_client psutil   (without them tests/integration fails to collect)
# Workload traces (../shared/data does not travel): `mkdir -p .data && cp -r ../shared/data/traces .data/`, carry .data
[ -d .data/traces ] && export ACCORDION_DATA_DIR=$PWD/.data
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
steps=${*:-tests offline kernels}
touch /tmp/suite-start
for step in $steps; do
  echo "=== $step ($(date +%T))"
  case $step in
    tests) python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/workers tests/integration 2>&1 | tail -25 | tee "$OUT/gpu_tests.log" ;;
    multi-gpu-tests) timeout 480 python3 -m pytest -v -m gpu -p no:cacheprovider tests/workers/test_multi_master.py \
        tests/integration/test_elastic_sp.py 2>&1 | tee "$OUT/multi_gpu_tests.log" | grep -E "PASS|FAIL|ERROR|Error|passed|failed" ;;
    offline) python3 bench/offline.py --compare-torch-backend --compare-async 2>&1 | grep -v "Loading weights" | tee "$OUT/offline.log" | tail -30 ;;
    offline-1b) python3 bench/offline.py --shapes 1b 2>&1 | grep -v "Loading weights" | tee "$OUT/offline.log" | tail -30 ;;
    tune) python3 bench/tune_attention.py 2>&1 | tee "$OUT/tune.log" | tail -40 ;;
    tune-lean) python3 bench/tune_attention.py --lean 2>&1 | tee "$OUT/tune-lean.log" | tail -12 ;;
    tune-tma) python3 bench/tune_attention.py --tma 2>&1 | tee "$OUT/tune-tma.log" | tail -12 ;;
    tune-orders) python3 bench/tune_attention.py --orders 2>&1 | tee "$OUT/tune-orders.log" | tail -24 ;;
    kernels) python3 bench/kernels.py 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    serving) python3 bench/serving_overhead.py 2>&1 | grep -v "Loading weights" | tee "$OUT/serving.log" | tail -9 ;;
    sp) python3 bench/sp_prefill.py --shape 8b --lengths 32768,131072 --degrees 1,2,4 2>&1 | grep -v "Loading weights" | tee "$OUT/sp.log" | tail -14 ;;
    sp-batch) python3 bench/sp_prefill.py --shape 8b --lengths 8192,16384 --degrees "$(python3 -c 'import torch; print("2,4" if torch.cuda.device_count() >= 4 else "2")')" --batch 4 2>&1 | grep -v "Loading weights" | tee "$OUT/sp-batch.log" | tail -14 ;;
    mixed) # Past MIXED_TIMEOUT seconds: dump the Python stacks of the server, its actors and engines (py-spy), stop the run
           if [ -n "${MIXED_TIMEOUT:-}" ]; then
             ( sleep "$MIXED_TIMEOUT"
               for pid in $(pgrep -f "accordion|ray::Inst|multiprocessing|bench/serve.py"); do
                 echo "=== pid $pid: $(tr '\0' ' ' < /proc/$pid/cmdline | head -c 160)"; timeout 15 py-spy dump --pid "$pid" 2>&1 | head -60
               done > "$OUT/stacks.txt"; pkill -INT -f bench/mixed_workload.py ) >/dev/null 2>&1 &
             watcher=$!
           fi
           python3 bench/mixed_workload.py --shape 8b --num-instances "$(python3 -c 'import torch; print(torch.cuda.device_count())')" ${MIXED_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/mixed.log" | tail -12
           [ -n "${watcher:-}" ] && kill "$watcher" 2>/dev/null  # finished in time: no dump (its idle sleep is left)
           for f in /tmp/accordion-mixed-*/server-*.log; do [ -f "$f" ] && tail -c 4000000 "$f" > "$OUT/$(basename "$f")"; done ;;
    multi-master) python3 bench/multi_master.py 2>&1 | grep -v "Loading weights" | tee "$OUT/multi-master.log" | tail -6 ;;
    layers) python3 bench/layers.py 2>&1 | tee "$OUT/layers.log" | tail -16 ;;
    ring) python3 bench/ring_attention.py --compare-capped 2>&1 | tee "$OUT/ring.log" | tail -20 ;;
    decode-profile) for shape in 8b 1b; do python3 bench/profile_decode.py --shape $shape 2>&1 | grep -v "Loading weights" | tail -4; done ;;
    serving-noray) python3 bench/serving_overhead.py --no-ray 2>&1 | grep -v "Loading weights" | tee "$OUT/serving-noray.log" | tail -6 ;;
    serving-sync) python3 bench/serving_overhead.py --no-async-scheduling 2>&1 | grep -v "Loading weights" | tee "$OUT/serving-sync.log" | tail -6 ;;
    profile) python3 bench/profile_steps.py --shape 1b ${PROFILE_ARGS:-} 2>&1 | grep -v "Loading weights" | tee "$OUT/profile.log" | tail -12 ;;
    *) echo "unknown step $step" ;;
  esac
done
find bench/results -name '*.json' -newer /tmp/suite-start -exec cp {} "$OUT"/ \; 2>/dev/null || true
echo "=== done ($(date +%T))"
