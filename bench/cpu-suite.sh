#!/usr/bin/env bash
# freeski-bot's CPU path beside llama.cpp's CPU backend on the same GGUF file and the same
# cores, in one run (the embedded default: SmolLM2-135M Q4_1, fetched by .ci/fetch-test-models.sh).
#
#   bash bench/cpu-suite.sh [FILE]
#
# Needs .gpu/peers/llama.cpp.tar.gz (bench/peers/fetch-llamacpp.sh), CMake and a C++ compiler;
# builds llama.cpp's CPU backend once into $WORK/build-cpu and freeski-bot with --release.
# Prints llama-bench's pp512, tg128 and pp100+tg1, then `freeski-bot bench generate` (prefill
# 512, 100-token prompt + first token, 128 decoded tokens), with candle's own CPU kernels timed
# in the same process.
set -euo pipefail
FILE=${1:-$HOME/.cache/freeski-test-models/SmolLM2-135M-Instruct.Q4_1.gguf}
export WORK=${WORK:-/tmp/llamacpp} LLAMA_CPU=1
[ -x "$WORK/build-cpu/bin/llama-bench" ] || bash bench/peers/llamacpp.sh build >/dev/null
cargo build --release --locked -q --bin freeski-bot
echo "## $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, commit $(git rev-parse --short HEAD)"
echo "## llama.cpp (CPU backend, $(nproc) threads)"
bash bench/peers/llamacpp.sh bench "$FILE"
echo "## freeski-bot"
"${CARGO_TARGET_DIR:-target}/release/freeski-bot" bench generate --model "$FILE" --device cpu --streams 0 --repeats 3
