#!/usr/bin/env bash
# The GPU check of issue 3 as ONE call on a lent device machine (see bench/bench_gpu.py).
#
# That machine has PyTorch, Triton, einops, PyYAML and tqdm but no network, so fla-core travels
# as a wheel. Here, once, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl "fla-core==0.6.0"
# then, with the device tool: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=540)
#
# Budget: Triton compiles and autotunes chunk_rwkv7 on its first calls (minutes, not seconds);
# bench_gpu.py warms up before every timing. The log is also written to $OUT/bench_gpu.log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/bench_gpu.py --sizes "${SIZES:-0.1b,1.5b}" --T "${T:-1024}" 2>&1 | tee "${OUT:-/tmp}/bench_gpu.log"
