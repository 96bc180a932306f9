#!/usr/bin/env bash
# One device call for the QLoRA training targets: the CUDA kernels' parity check, `bench train`
# on the random Mistral-7B shape (r=16, r=16 without dropout, r=2, and r=16 on a simulated 7 GB
# card), `bench serve-train` on a simulated 8 GB card, then the PyTorch + PEFT baseline at the
# same shapes. Usage on the GPU machine, from the project root:  bash bench/gpu-issue4.sh
set -uo pipefail
source .gpu/activate
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
freeski-bot bench parity --device cuda:0 2>&1 | tail -8 | tee "$OUT/parity.txt"
T="freeski-bot bench train --random mistral-7b --seq 512 --batch 2 --device cuda:0"
{
  $T --rank 16 --json "$OUT/train-r16.json"
  $T --rank 16 --dropout 0
  $T --rank 2
  # 7.0 GB above the CUDA context: an out-of-memory error here means the target is missed.
  $T --rank 16 --leave-free-gb 7.0
} 2>&1 | grep -v "^\s*$" | tee "$OUT/train.txt"
# 8 GB card: 8.0 GB minus the ~0.6 GB the CUDA context takes.
freeski-bot bench serve-train --random mistral-7b --device cuda:0 --questions 5 --new-tokens 64 --leave-free-gb 7.4 2>&1 | tail -8 | tee "$OUT/serve-train.txt"
# PEFT is not installed on that machine: the wheel travels in .gpu/wheels.
PYDIR=/tmp/peft-lib; pip install -q --no-deps --target "$PYDIR" .gpu/wheels/peft-*.whl >/dev/null 2>&1
for r in 16 2; do
  PYTHONPATH="$PYDIR" python3 bench/pytorch_train.py --seq 512 --batch 2 --rank $r 2>&1 | tail -3 | tee "$OUT/pytorch-r$r.txt"
done
