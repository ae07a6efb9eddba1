#!/usr/bin/env bash
# On the GPU machine (device tool), from the project root, after
# `bash .device_mlx/p1/install_mlx_cuda.sh 1` (carry .device_mlx/p1): two calls back to back
# (the machine stays warm ~30 s), each carrying .device_mlx/p2 and .whl (xlstm, mlstm_kernels):
#   bash tools/gpu_run.sh kernels   # MLX CUDA step 2, the kernel tests (first-use checks not remembered)
#   bash tools/gpu_run.sh peer      # the peer (tools/bench_peer.py: torch.compile takes ~3 min),
#                                   # the 7B random folders, speculative decoding's tests
#   bash tools/gpu_run.sh steady    # ours through mlx-lm's tools: benchmark, batch_generate, server
#                                   # (tools/bench.py --tools-only; the kernels' build ~160 s
#                                   # first), BUDGET 570 unless set: give the call 600 s
#   bash tools/gpu_run.sh speculative  # speculative decoding at 7B (tools/bench_speculative.py)
#   bash tools/gpu_run.sh harness   # the harness rows that explain them (floors, cell, eager/ops)
#   bash tools/gpu_run.sh startup   # start-up vs a 7B llama (tools/bench_startup.py), ~7 min
#   bash tools/gpu_run.sh kernelab DIR  # kernel bodies of DIR (a commit's mlx_lm_xlstm/, carried:
#                                   # `git archive REV mlx_lm_xlstm/kernels | tar -x -C DIR`) against
#                                   # the tree's: outputs, then decode and prefill, one kernel
#                                   # swapped at a time (bench_kernels.py)
#   bash tools/gpu_run.sh hostcost  # a fused kernel's host cost a call by its binary's size, and
#                                   # decode with the binaries padded (bench_host_cost.py)
#   bash tools/gpu_run.sh hostprofile  # the host's time by op kind (MLX's NVTX ranges) in a
#                                   # decode step and a prompt call (bench_host_profile.py)
#   bash tools/gpu_run.sh newlength # after peer (its folders): one process each, new prompt
#                                   # lengths with MLX's CUDA graphs on and off (is a new
#                                   # length's extra time graph instantiation?)
# (In one 330 s call, the peer's compile left no time for our rows: run H200-1 in BENCHMARKS.md.)
# Results and logs go to $OUT; the model folders stay in /tmp/su for the later calls. Each call
# ends within BUDGET seconds (default 430).
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
# a warm machine may already have MLX's CUDA build
python3 -c "import mlx.core as mx; assert mx.cuda.is_available()" 2>/dev/null \
  || bash .device_mlx/p2/install_mlx_cuda.sh 2 || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site"
# mlx-lm's own CLIs find the plugin through its registration hook
printf '%s\nimport mlx_lm_xlstm._hook\n' "$PWD" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/mlx_lm_xlstm_dev.pth"
WORK=/tmp/su; mkdir -p $WORK
[ "$1" = steady ] && : "${BUDGET:=570}"  # the tools rows alone take ~7 min on a fresh machine
left() { echo $(( ${BUDGET:-430} - ($(date +%s) - started) )); }

if [ "$1" = startup ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import mlx.core as mx, mlx_lm, torch, triton; print('mlx', mx.__version__, mx.default_device(), 'mlx_lm', mlx_lm.__version__, 'torch', torch.__version__, 'triton', triton.__version__)"
    cat COMMIT 2>/dev/null; } | tee "$OUT/machine.txt"
  timeout $(( $(left) - 5 )) python3 tools/bench_startup.py --dir $WORK --shape 7b --json $WORK/startup.json 2>&1 | tee "$OUT/startup.log"
  cp $WORK/startup.json $WORK/server-*.log "$OUT/" 2>/dev/null
elif [ "$1" = peer ]; then
  timeout $(( $(left) - 150 )) python3 tools/bench_peer.py --shape 7b --prefill 8192 --batches 1,16 --json $WORK/peer.json 2>&1 | tee "$OUT/peer.log"
  cp $WORK/peer.json "$OUT/" 2>/dev/null
  python3 tools/random_models.py $WORK --shape 7b 2>&1 | tail -2
  # speculative decoding's exactness through the fused step and the compiled rounds
  timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/test_speculative.py 2>&1 | tail -25 | tee "$OUT/test_speculative.log"
elif [ "$1" = kernels ]; then
  # the kernels themselves: no remembered first-use checks
  MLX_XLSTM_CACHE_DIR=$(mktemp -d) timeout $(( $(left) - 5 )) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -25 | tee "$OUT/test_kernels.log"
elif [ "$1" = steady ]; then
  timeout $(( $(left) - 5 )) python3 tools/bench.py --shape 7b --tools-only --mlx-lm $WORK/xlstm --server \
    --peer-json $WORK/peer.json --json "$OUT/tools_7b.json" 2>&1 | tee "$OUT/tools_7b.log"
  cp $WORK/server-xlstm.log "$OUT/" 2>/dev/null
elif [ "$1" = speculative ]; then
  timeout $(( $(left) - 5 )) python3 tools/bench_speculative.py --shape 7b --json "$OUT/speculative_7b.json" 2>&1 | tail -40 | tee "$OUT/speculative.log"
elif [ "$1" = kernelab ]; then
  timeout $(( $(left) - 5 )) python3 tools/bench_kernels.py --against "$2" --json "$OUT/kernels_ab.json" 2>&1 | tee "$OUT/kernels_ab.log"
elif [ "$1" = newlength ]; then
  for model in xlstm llama; do
    for graphs in 1 0; do
      MLX_USE_CUDA_GRAPHS=$graphs MLX_XLSTM_WARM_UP=0 timeout $(( $(left) - 5 )) python3 tools/bench_startup.py session \
        --model $WORK/$model --out "$OUT/session-$model-graphs$graphs.json" 2>&1 | grep "session length" | sed "s/^/$model graphs=$graphs /"
    done
  done
elif [ "$1" = hostcost ]; then
  MLX_XLSTM_WARM_UP=0 timeout $(( $(left) - 5 )) python3 tools/bench_host_cost.py --json "$OUT/host_cost.json" 2>&1 | tee "$OUT/host_cost.log"
elif [ "$1" = hostprofile ]; then
  MLX_XLSTM_WARM_UP=0 timeout $(( $(left) - 5 )) python3 tools/bench_host_profile.py --json "$OUT/host_profile.json" 2>&1 | tail -60 | tee "$OUT/host_profile.log"
elif [ "$1" = harness ]; then
  timeout $(( $(left) - 5 )) python3 tools/bench.py --shape 7b --prefill 8192 --batches 1,16 --steps 48 --quant 4 \
    --peer-json $WORK/peer.json --json "$OUT/bench_7b.json" 2>&1 | tee "$OUT/bench_7b.log"
else
  echo "usage: bash tools/gpu_run.sh kernels|peer|steady|speculative|harness|startup|kernelab DIR|newlength|hostcost|hostprofile" >&2; exit 2
fi
echo "gpu_run $1 done after $(( $(date +%s) - started )) s"
