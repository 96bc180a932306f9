#!/usr/bin/env bash
# One device call for the performance issue's inference targets: CPU/GPU parity (the dense
# prefill path included), `bench generate` on the random Mistral-7B shape (bare and with a
# rank-16 LoRA; prefill, time to first token, decode at batch 1 and 8 concurrent streams),
# `bench serve-train` on a simulated 8 GB card (engine time to first token, hot-swap, memory),
# then the PyTorch bf16 baseline, bare and with a PEFT LoRA of rank 16. Usage on the GPU
# machine, from the project root:
#   bash bench/gpu-issue7.sh
set -uo pipefail
source .gpu/activate
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
F='^ *[0-9]*: <unknown>|^\s*$|INFO'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
freeski-bot bench parity --device cuda:0 2>&1 | grep -Ev "$F" | tee "$OUT/parity.txt"
# Each run times the fused decode / dense prefill and, in the same process, candle's ops alone.
for r in 0 16; do
  freeski-bot bench generate --random mistral-7b --device cuda:0 --lora-rank $r --json "$OUT/gen-r$r.json" 2>&1 | grep -Ev "$F" | tee "$OUT/gen-r$r.txt"
done
freeski-bot bench generate --random mistral-7b --quant q4k-m --device cuda:0 --lora-rank 16 --repeats 2 2>&1 | grep -Ev "$F" | tee "$OUT/gen-q4km-r16.txt"
# Kernel time per stage of one fused decode token (r=16): ncu with the card's own clocks and
# caches (the default of locked base clocks and flushed caches inflates every kernel).
A="bench generate --random mistral-7b --device cuda:0 --lora-rank 16 --repeats 1 --streams 0 --compare false --prompt-tokens 64 --ttft-tokens 16 --decode-tokens 16"
/usr/local/cuda/bin/ncu --cache-control none --clock-control none --csv --metrics gpu__time_duration.sum \
  -k 'regex:^(mv_|attn_|rope_|rmsnorm|lora_a|embed|quantize)' --launch-skip 1800 --launch-count 451 \
  freeski-bot $A > "$OUT/ncu.csv" 2>/dev/null && python3 bench/ncu_summary.py "$OUT/ncu.csv" | tee "$OUT/ncu.txt"
freeski-bot bench serve-train --random mistral-7b --device cuda:0 --questions 5 --new-tokens 64 --leave-free-gb 8.0 2>&1 | grep -Ev "$F" | tail -11 | tee "$OUT/serve-train.txt"
python3 bench/pytorch_generate.py 2>&1 | tail -12 | tee "$OUT/pytorch.txt"
# PEFT is not installed on that machine: its wheel travels in .gpu/wheels (download it there first:
#   python3 -m pip download --no-deps --only-binary=:all: -d .gpu/wheels peft==0.21.2).
PYDIR=/tmp/peft-lib; pip install -q --no-deps --target "$PYDIR" .gpu/wheels/peft-*.whl >/dev/null 2>&1
PYTHONPATH="$PYDIR" python3 bench/pytorch_generate.py --lora-rank 16 2>&1 | tail -12 | tee "$OUT/pytorch-r16.txt"
