#!/usr/bin/env bash
# On the GPU machine (device tool), after `bash .device_mlx/p1/install_mlx_cuda.sh 1`:
# finish MLX's CUDA install, run the kernel tests, then the 7B side-by-side benchmark.
# Carry: .device_mlx/p2 .whl (mlstm_kernels wheel). Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
# a warm machine may already have MLX's CUDA build
python3 -c "import mlx.core as mx; assert mx.cuda.is_available()" 2>/dev/null \
  || bash .device_mlx/p2/install_mlx_cuda.sh 2 || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import mlx.core as mx, torch, transformers, triton, mlstm_kernels; print('mlx', mx.__version__, mx.default_device(), 'torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
[ -n "$SKIP_TESTS" ] || timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/test_kernels.log"
timeout "${BENCH_TIMEOUT:-420}" python3 tools/bench.py --shape 7b ${BENCH_ARGS:---reference native,triton --long 32768,100000} \
  --json "$OUT/bench_7b.json" 2>&1 | tee "$OUT/bench_7b.log"
