#!/usr/bin/env bash
# freeski-bot's CPU path beside llama.cpp's CPU backend on the same GGUF file and the same
# cores, in one run (the embedded default: SmolLM2-135M Q4_1, fetched by .ci/fetch-test-models.sh).
#
#   bash bench/cpu-suite.sh [FILE]
#
# Needs .gpu/peers/llama.cpp.tar.gz (bench/peers/fetch-llamacpp.sh), CMake and a C++ compiler;
# builds llama.cpp's CPU backend once into $WORK/build-cpu and freeski-bot with --release.
# Prints llama-bench's pp512, tg128 and pp100+tg1, then `freeski-bot bench generate` (prefill
# 512, 100-token prompt + first token, 128 decoded tokens), taking turns ROUNDS times (default 2).
set -euo pipefail
FILE=${1:-$HOME/.cache/freeski-test-models/SmolLM2-135M-Instruct.Q4_1.gguf}
export WORK=${WORK:-/tmp/llamacpp} LLAMA_CPU=1
[ -x "$WORK/build-cpu/bin/llama-bench" ] || bash bench/peers/llamacpp.sh build >/dev/null
cargo build --release --locked -q --bin freeski-bot
echo "## $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, commit $(git rev-parse --short HEAD)"
# Shared machines drift by tens of percent within minutes: the two take turns, ROUNDS times
# (candle's own kernels are timed beside ours in the first round only).
for round in $(seq "${ROUNDS:-2}"); do
  echo "## round $round: llama.cpp (CPU backend, $(nproc) threads)"
  bash bench/peers/llamacpp.sh bench "$FILE" | grep -E '^\| llama'
  echo "## round $round: freeski-bot"
  "${CARGO_TARGET_DIR:-target}/release/freeski-bot" bench generate --model "$FILE" --device cpu --streams 0 --repeats 3 \
    --compare "$([ "$round" = 1 ] && echo true || echo false)" 2>&1 | grep -E 'path|prefill|first|decode'
done
