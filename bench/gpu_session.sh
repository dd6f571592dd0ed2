#!/usr/bin/env bash
# The GPU checks as ONE call on a lent device machine, in sections ordered by what the open issues
# need most, each given what is left of one time budget (so a call that runs short of time still
# returns the first sections' figures; the rest print "skipped"):
#   1. kernels: fla vs chunked in fp32 and bf16, WKV timings (bench/bench_gpu.py)
#   2. quant:   a LoRA step over a none / int8 / nf4 base, tok/s and peak memory against the planner
#               (bench/bench_quant.py --gpu; nf4 through bitsandbytes; chunked WKV, no autotuning)
#   3. train:   timed train steps (0.1B and 1.5B, full and LoRA), an FSDP step, a 7.2B LoRA step
#   4. speed:   issue 27's CPU figures on the GPU, 0.1B shape: training step fwd+bwd vs the matmul
#               bound, prefill T=$T, decode B=1 and B=32 through BatchDecoder vs the bandwidth
#               limit, each eager and under torch.compile, first call apart, peak memory
#   5. fsdp:    the trainer's own fsdp runs (from scratch, then from its final.pth with cpu_offload)
#
# That machine has PyTorch, Triton, einops, PyYAML and tqdm but no network, so fla-core travels
# as a wheel. Here, once, from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl "fla-core==0.6.0" bitsandbytes
#   for v in 3.10 3.11 3.12 3.13; do python3 -m pip download --no-deps -d .whl --only-binary=:all: \
#     --python-version $v --platform manylinux2014_x86_64 "pyrwkv-tokenizer==0.9.1"; done
# (bitsandbytes is for nf4 in section 2, the tokenizer for section 5; each is skipped without it)
# Before the call, here: RWKVTUNE_SLOW_TESTS=1 python -m pytest -q tests/test_wkv.py -k gpu_script (the
# script's CPU self-check and its compile paths traced against eager), and
# DRY=1 bash bench/gpu_session.sh (prints each section's command; tests/test_wkv.py runs it too).
# Then, with the device tool: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=560)
#
# BUDGET (seconds, default 500) is the whole script's time; keep it under the call's timeout_s.
# A section starts only with at least its minimum left (kernels 60, quant 90, train 120, speed 90,
# fsdp 60) and is stopped when the budget ends. Triton compiles and autotunes fla's kernels on their
# first calls in every new process (minutes, not seconds); bench_gpu.py warms up before each timing.
# SKIP_BIG=1 leaves out the 7.2B step (it builds a 14 GB random model on the GPU). SKIP_SPEED=1,
# SKIP_QUANT=1, SKIP_TRAIN=1 leave out sections; SPEED_COMPILE=off keeps only the speed section's eager
# figures (its compiled ones together stop at SPEED_BUDGET seconds, default 150).
# The log is also written to $OUT/bench_gpu.log.
set -o pipefail
BUDGET=${BUDGET:-500}
START=$SECONDS
LOG="${OUT:-/tmp}/bench_gpu.log"
: > "$LOG"

section() {  # section NAME MIN_SECONDS COMMAND...: run COMMAND within what is left of the budget
  local name=$1 need=$2 left
  shift 2
  left=$(( BUDGET - (SECONDS - START) ))
  if (( left < need )); then
    echo "=== $name: skipped ($left s left of the $BUDGET s budget; it needs $need)" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (at $(( SECONDS - START )) s, $left s left)" | tee -a "$LOG"
  if [ -n "${DRY:-}" ]; then
    echo "$*" | tee -a "$LOG"
    return 0
  fi
  timeout --kill-after=15 "$left" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if (( rc == 124 || rc == 137 )); then echo "=== $name: stopped at the end of the budget" | tee -a "$LOG"; fi
  return 0
}

if [ -z "${DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/fla_core*.whl || exit 1
  for pkg in bitsandbytes pyrwkv-tokenizer; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site --find-links .whl \
      "$pkg" 2>/dev/null || echo "no $pkg wheel for this python: the sections that need it skip its part"
  done
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
GPU=(python3 bench/bench_gpu.py --sizes "${SIZES:-0.1b,1.5b}" --T "${T:-1024}")

section kernels 60 "${GPU[@]}" --skip-train --skip-speed

[ -z "${SKIP_QUANT:-}" ] && section quant 90 python3 bench/bench_quant.py --gpu --size "${QUANT_SIZE:-1.5b}" \
  --T "${T:-1024}" --runs 3 --wkv-backend chunked

[ -z "${SKIP_TRAIN:-}" ] && section train 120 "${GPU[@]}" --skip-kernels --skip-speed ${SKIP_BIG:+--skip-big}

[ -z "${SKIP_SPEED:-}" ] && section speed 90 "${GPU[@]}" --skip-kernels --skip-train \
  --speed-compile "${SPEED_COMPILE:-auto}" --speed-budget "${SPEED_BUDGET:-150}" --decode-tokens "${DECODE_TOKENS:-32}"

# The trainer itself under fsdp on this GPU (chunked WKV: no autotuning): from scratch (each shard
# filled from the seeded init), then from that final.pth with cpu_offload (shards read from the
# file into pinned host memory). Each prints its run header, the loss and the memory estimate.
if [ -n "${DRY:-}" ] || python3 -c "import pyrwkv_tokenizer" 2>/dev/null; then
  section "fsdp from scratch" 60 python3 -m rwkvtune train --config examples/recipes/quickstart.yaml \
    --out /tmp/fsdp-scratch --strategy fsdp --device cuda --max-steps 5 wkv_backend=chunked
  section "fsdp cpu_offload" 60 python3 -m rwkvtune train --model /tmp/fsdp-scratch/final.pth \
    --data rwkvtune/assets/sample.jsonl --out /tmp/fsdp-offload --cpu-offload --strategy fsdp --device cuda \
    --max-steps 5 wkv_backend=chunked
else
  echo "=== fsdp: skipped (no pyrwkv-tokenizer wheel for this python)" | tee -a "$LOG"
fi
echo "=== done at $(( SECONDS - START )) s of the $BUDGET s budget" | tee -a "$LOG"
