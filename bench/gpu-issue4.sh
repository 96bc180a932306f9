#!/usr/bin/env bash
# One device call for the QLoRA issue: `bench train` on the random Mistral-7B shape (r=16 and
# r=2, checkpointing on; r=16 also without), then the PyTorch + PEFT baseline at the same shapes.
# Usage on the GPU machine, from the project root:  bash bench/gpu-issue4.sh
set -uo pipefail
source .gpu/activate
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
for r in 16 2; do
  freeski-bot bench train --random mistral-7b --seq 512 --batch 2 --rank $r --device cuda:0 --json "$OUT/train-r$r.json" 2>&1 | tee "$OUT/train-r$r.txt"
done
freeski-bot bench train --random mistral-7b --seq 512 --batch 2 --rank 16 --device cuda:0 --no-checkpointing 2>&1 | tail -6 | tee "$OUT/train-r16-nockpt.txt"
# PEFT is not installed on that machine: the wheel travels in .gpu/wheels.
PYDIR=/tmp/peft-lib; pip install -q --no-deps --target "$PYDIR" .gpu/wheels/peft-*.whl >/dev/null 2>&1
for r in 16 2; do
  PYTHONPATH="$PYDIR" python3 bench/pytorch_train.py --seq 512 --batch 2 --rank $r 2>&1 | tail -3 | tee "$OUT/pytorch-r$r.txt"
done
