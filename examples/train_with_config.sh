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

exec "${PYTHON:-python}" -m rwkvtune train --model "$size" --data "$data" --out "$out" "$@"
