#!/usr/bin/env bash
# llama.cpp beside freeski-bot on the GPU machine (run from the project root there; needs
# .gpu/peers/llama.cpp.tar.gz from fetch-llamacpp.sh, CMake, a C++ compiler, nvcc, and PyTorch +
# transformers for the random checkpoint).
#
#   bash bench/peers/llamacpp.sh build            # llama-bench, llama-quantize, llama-server (~4 min, 16 cores)
#   bash bench/peers/llamacpp.sh mistral-q4km     # random Mistral-7B -> llama.cpp's converter ->
#                                                 # Q4_K_M GGUF at $WORK/mistral-7b-random.Q4_K_M.gguf
#   bash bench/peers/llamacpp.sh mistral-f16      # its first half (checkpoint + f16 GGUF), which
#                                                 # needs no build: run it beside `build`
#   bash bench/peers/llamacpp.sh bench FILE       # llama-bench: pp512, tg128, pp100+tg1, flash attention
#
# CPU backend only (no CUDA, no GPU machine; CMake and a C++ compiler):
#   LLAMA_CPU=1 bash bench/peers/llamacpp.sh build
#   LLAMA_CPU=1 bash bench/peers/llamacpp.sh bench FILE   # on every core
set -euo pipefail
WORK=${WORK:-/tmp/llamacpp}
SRC=$WORK/llama.cpp
BUILD=$WORK/build${LLAMA_CPU:+-cpu}
mkdir -p "$WORK"

# The source tree, unpacked once (build and mistral-f16 may start together).
unpack() {
  exec 8>"$WORK/unpack.lock"; flock 8
  [ -d "$SRC" ] || tar xzf .gpu/peers/llama.cpp.tar.gz -C "$WORK"
  flock -u 8
}

build() {
  unpack
  local cuda=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-90a})
  # CPU backend for this CPU (-march=native), without AMX: CPUs that list it in cpuinfo often
  # run in VMs whose kernel does not grant the tile registers (SIGILL at the first tile op).
  [ -n "${LLAMA_CPU:-}" ] && cuda=(-DGGML_CUDA=OFF "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                                   "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
  local gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$SRC" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release "${cuda[@]}" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null
  cmake --build "$BUILD" --target llama-bench llama-quantize llama-server -j"$(nproc)" 2>&1 | tail -2
  ls "$BUILD"/bin
}

# A random MistralForCausalLM (the Mistral-7B-v0.1 shape, bf16, seed 0) saved with the real
# Mistral tokenizer, converted by llama.cpp's convert_hf_to_gguf.py and quantized to Q4_K_M by
# llama-quantize: the format real Mistral files come in, made by llama.cpp's own tools. The
# checkpoint stays in $WORK/mistral-7b-random for the bitsandbytes QLoRA peer (gpu-suite `qlora`).
F16=$WORK/mistral-7b-random.f16.gguf
mistral_f16() {
  local hf=$WORK/mistral-7b-random
  [ -f "$F16" ] && return
  unpack
  python3 bench/mistral_shape.py "$hf"
  # Into temporary names first: a step cut short never passes for its finished file.
  PYTHONPATH=$SRC/gguf-py python3 "$SRC/convert_hf_to_gguf.py" "$hf" --outtype f16 --outfile "$F16.part.gguf" 2>&1 | tail -2
  mv "$F16.part.gguf" "$F16"
}

mistral_q4km() {
  local q=$WORK/mistral-7b-random.Q4_K_M.gguf
  [ -f "$q" ] && { echo "$q"; return; }
  mistral_f16
  "$BUILD/bin/llama-quantize" "$F16" "$q.part" Q4_K_M 2>&1 | tail -2
  mv "$q.part" "$q"
  rm -f "$F16"
  echo "$q"
}

bench() {
  local f=$1 dev=(-ngl 99)
  # CPU backend: every core (-t), as freeski-bot's CPU path uses them.
  [ -n "${LLAMA_CPU:-}" ] && dev=(-ngl 0 -t "$(nproc)")
  "$BUILD/bin/llama-bench" -m "$f" "${dev[@]}" -fa 1 -p 512 -n 128 -r 3 -o md
  "$BUILD/bin/llama-bench" -m "$f" "${dev[@]}" -fa 1 -p 0 -n 0 -pg 100,1 -r 3 -o md
}

cmd=${1:-}; shift || true
case "$cmd" in
  # One build at a time (a stage may start one while another runs): the second waits, then
  # finds the targets built.
  build) exec 9>"$WORK/build.lock"; flock 9; build ;;
  mistral-f16) mistral_f16 ;;
  mistral-q4km) mistral_q4km ;;
  bench) bench "$@" ;;
  *) echo "usage: $0 build | mistral-f16 | mistral-q4km | bench FILE" >&2; exit 2 ;;
esac
