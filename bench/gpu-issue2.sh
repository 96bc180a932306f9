#!/usr/bin/env bash
# One device call for the LLM-core issue: CPU/GPU parity, then bench generate on the random
# Mistral-7B shape (bare base and with a rank-16 LoRA), then the PyTorch bf16 baseline.
# Usage on the GPU machine, from the project root:  bash bench/gpu-issue2.sh
set -uo pipefail
source .gpu/activate
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
freeski-bot bench parity --device cuda:0 2>&1 | tee "$OUT/parity.txt"
freeski-bot bench generate --random mistral-7b --device cuda:0 --json "$OUT/gen-r0.json" 2>&1 | tee "$OUT/gen-r0.txt"
freeski-bot bench generate --random mistral-7b --device cuda:0 --lora-rank 16 --json "$OUT/gen-r16.json" 2>&1 | tee "$OUT/gen-r16.txt"
python3 bench/pytorch_generate.py 2>&1 | tail -20 | tee "$OUT/pytorch.txt"
