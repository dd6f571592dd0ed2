#!/usr/bin/env bash
# Train a registry model with its recommended settings (ctx_len, batch size, learning rate).
#
#   bash examples/train_with_config.sh 0.1b                       # sample data, runs/rwkv7-0.1b
#   bash examples/train_with_config.sh 1.5b --data my.jsonl --mode lora
#   DATA=corpus OUT=runs/x bash examples/train_with_config.sh 2.9b --max-steps 1000
#
# The model file is looked up in $RWKVTUNE_MODEL_DIR (default ~/.rwkvtune/models); when it is
# missing the trainer says where it looked and how to fix it. Every extra argument goes to
# `rwkvtune train` (flags and key=value overrides), so later flags override the defaults here.
#
# With two or more CUDA GPUs visible (CUDA_VISIBLE_DEVICES decides), it runs one process per GPU
# under torchrun with the strategy `rwkvtune plan SIZE --pick` chooses for these GPUs (the cheapest of
# ddp, fsdp, fsdp + cpu_offload whose memory estimate fits them); a strategy= or cpu_offload= of your
# own wins. Otherwise it runs one process, as before. Either way the trainer checks the memory
# estimate before loading weights and, when the run does not fit, stops with the settings that do.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  echo "usage: bash examples/train_with_config.sh SIZE [rwkvtune train args...]" >&2
  echo "SIZE: a registry name such as 0.1b, 0.4b, 1.5b, 2.9b, 7.2b, 13.3b (see: rwkvtune models)" >&2
  exit 2
fi
size="$1"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
data="${DATA:-$here/../rwkvtune/assets/sample.jsonl}"
out="${OUT:-runs/rwkv7-$size}"
python="${PYTHON:-python}"

# "GPUS GIB": the CUDA GPUs torch sees and the smallest one's memory
found="$("$python" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(n, min((torch.cuda.get_device_properties(i).total_memory for i in range(n)), default=0) / 2 ** 30)' \
        2>/dev/null || echo "0 0")"
gpus="${found%% *}"
if [ "$gpus" -ge 2 ]; then
  # e.g. "--strategy fsdp --cpu-offload"; the reason goes to stderr
  launch="$("$python" -m rwkvtune plan "$size" --pick --gpus "$gpus" --gpu-memory "${found##* }" \
            --train-args --model "$size" "$@")"
  # shellcheck disable=SC2086  # $launch is flag words
  exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$gpus" -m rwkvtune train \
    --model "$size" --data "$data" --out "$out" $launch "$@"
fi
exec "$python" -m rwkvtune train --model "$size" --data "$data" --out "$out" "$@"
