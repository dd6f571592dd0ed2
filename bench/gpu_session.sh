#!/usr/bin/env bash
# The GPU checks as ONE call on a lent device machine (see bench/bench_gpu.py): fla vs chunked in fp32
# and bf16, WKV timings, timed train steps (0.1B and 1.5B, full and LoRA), an FSDP step, a 7.2B LoRA step,
# then the model speed section (issue 27's CPU figures on the GPU, 0.1B shape: training step fwd+bwd vs
# the matmul bound, prefill T=$T, decode B=1 and B=32 through BatchDecoder vs the bandwidth limit, each
# eager and under torch.compile, first call apart, peak memory), then the trainer's own fsdp runs and
# LoRA over an int8 / nf4 base (bench/bench_quant.py --gpu).
#
# That machine has PyTorch, Triton, einops, PyYAML and tqdm but no network, so fla-core travels
# as a wheel. Here, once, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl "fla-core==0.6.0"
#   for v in 3.10 3.11 3.12 3.13; do python3 -m pip download --no-deps -d .whl --only-binary=:all: \
#     --python-version $v --platform manylinux2014_x86_64 "pyrwkv-tokenizer==0.9.1"; done
# (the tokenizer is for the trainer's own fsdp runs at the end; they are skipped without it)
# Before the call, here: RWKVTUNE_SLOW_TESTS=1 python -m pytest -q tests/test_wkv.py -k gpu_script (the
# script's CPU self-check and its compile paths traced against eager).
# then, with the device tool: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=540)
# SKIP_BIG=1 leaves out the 7.2B step (it builds a 14 GB random model on the GPU). SKIP_SPEED=1 leaves
# out the speed section; SPEED_COMPILE=off keeps only its eager figures.
#
# Budget (the whole script should fit about 9 minutes on an H100; not yet measured on one): Triton
# compiles and autotunes chunk_rwkv7 on its first calls (minutes, not seconds); bench_gpu.py warms up
# before every timing. The speed section's eager figures take well under a minute (5 timed steps,
# DECODE_TOKENS=32 decode steps); its compiled figures together stop at SPEED_BUDGET seconds (default
# 150: a compile still running then ends with a FAILED line, later ones print "skipped"), in the order
# train, prefill, decode B=1, decode B=32. The log is also written to $OUT/bench_gpu.log.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fla_core*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links .whl \
  pyrwkv-tokenizer 2>/dev/null || echo "no pyrwkv-tokenizer wheel for this python: the trainer's fsdp runs are skipped"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/bench_gpu.py --sizes "${SIZES:-0.1b,1.5b}" --T "${T:-1024}" ${SKIP_BIG:+--skip-big} \
  ${SKIP_SPEED:+--skip-speed} --speed-compile "${SPEED_COMPILE:-auto}" --speed-budget "${SPEED_BUDGET:-150}" \
  --decode-tokens "${DECODE_TOKENS:-32}" 2>&1 | tee "${OUT:-/tmp}/bench_gpu.log"

# The trainer itself under fsdp on this GPU (chunked WKV: no autotuning): from scratch (each shard
# filled from the seeded init), then from that final.pth with cpu_offload (shards read from the
# file into pinned host memory). Each prints its run header, the loss and the memory estimate.
if python3 -c "import pyrwkv_tokenizer" 2>/dev/null; then
  for run in "--config examples/recipes/quickstart.yaml --out /tmp/fsdp-scratch" \
             "--model /tmp/fsdp-scratch/final.pth --data rwkvtune/assets/sample.jsonl --out /tmp/fsdp-offload --cpu-offload"; do
    python3 -m rwkvtune train $run --strategy fsdp --device cuda --max-steps 5 wkv_backend=chunked 2>&1 \
      | grep -v "step/s" | tail -n 12 | tee -a "${OUT:-/tmp}/bench_gpu.log"
  done
fi

# The quantized frozen base (--base-quant) on this GPU: a LoRA step over a none / int8 / nf4 base,
# tok/s and peak memory against the planner (bench/bench_quant.py --gpu). nf4 needs bitsandbytes,
# which travels as a wheel like fla-core (here, once: python3 -m pip download --no-deps -d .whl
# bitsandbytes); without it only none and int8 run. SKIP_QUANT=1 leaves this out.
if [ -z "${SKIP_QUANT:-}" ]; then
  ls .whl/bitsandbytes*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site .whl/bitsandbytes*.whl
  python3 bench/bench_quant.py --gpu --size "${QUANT_SIZE:-1.5b}" --T "${T:-1024}" --runs 3 2>&1 \
    | tee -a "${OUT:-/tmp}/bench_gpu.log"
fi
