#!/usr/bin/env bash
# Build the project's CUDA binary on a machine with no GPU and no CUDA toolkit, and pack it
# (with a loader script) into .gpu/ for a machine that has an NVIDIA driver >= 580 (CUDA 13.0).
#
#   scripts/cuda/build.sh                      # builds --bin freeski-bot --features cuda, and the
#                                              # GPU correctness tests (tests/cuda_parity.rs)
#   BIN=freeski-bot FEATURES=cuda scripts/cuda/build.sh
#   CUDA_COMPUTE_CAP=86 scripts/cuda/build.sh  # another GPU generation (default 90: H100/H200):
#                                              # PTX for compute_86, which the driver compiles for
#                                              # the card it runs on (RTX 30 = 86, RTX 40 = 89, and
#                                              # newer; candle's quantized matmuls get it too, and
#                                              # the build checks they did); packed as
#                                              # .gpu/<BIN>-sm86.xz
#   CHECK=1 scripts/cuda/build.sh              # only clippy (-D warnings) on every target with
#                                              # the CUDA code compiled in, which the CPU build
#                                              # (and so the test command) never compiles
#
# Run it from the project root. It writes .gpu/<BIN>.xz (.gpu/<BIN>-sm<CAP>.xz for a capability
# other than 90) and .gpu/activate; keep .gpu/ in .gitignore. On the GPU machine, from the project root:  source .gpu/activate; <BIN> ...
#
# How: the CUDA 13.0 compiler, headers and libraries come as Python wheels (unpacked, never
# installed into a Python) into a cache folder; candle's build uses that nvcc; the link against
# libcuda uses a stub generated from cudarc's own symbol list; the real driver library is found
# at run time. The toolkit MUST stay 13.0.x: driver 580 cannot JIT PTX from a newer nvcc.
# A clean build takes ~10 minutes on 2 cores (mostly nvcc on candle-kernels); rebuilds of the
# project's own crate take seconds. The CPU build in target/ is left alone (target/cuda is used).
set -euo pipefail

BIN=${BIN:-freeski-bot}
FEATURES=${FEATURES:-cuda}
TK=${CUDA_WHEEL_TOOLKIT:-$HOME/.cache/cuda-13.0-wheels}
C=$TK/nvidia/cu13
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
[ -f Cargo.toml ] || { echo "run this from the project root (no Cargo.toml here)" >&2; exit 2; }

# 1. Toolkit from wheels (once; ~1.1 GB unpacked).
if [ ! -x "$C/bin/nvcc" ]; then
  mkdir -p "$TK/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$TK/wheels" \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
      nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
  for w in "$TK"/wheels/*.whl; do unzip -q -o "$w" -d "$TK"; done
fi

# 2. Make the wheel tree look like a toolkit: nvcc.profile wants targets/x86_64-linux, the
#    kernel build wants lib64, the link step wants unversioned library names.
mkdir -p "$C/targets/x86_64-linux" "$C/lib/stubs"
ln -sfn ../../include "$C/targets/x86_64-linux/include"
ln -sfn ../../lib "$C/targets/x86_64-linux/lib"
ln -sfn lib "$C/lib64"
( cd "$C/lib" && for f in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10; do
    ln -sfn "$f" "${f%.so.*}.so"; done )

export PATH=$C/bin:$PATH NVCC=$C/bin/nvcc CUDA_ROOT=$C CUDA_HOME=$C CUDA_PATH=$C
export CUDARC_CUDA_VERSION=13000
# One target folder per capability, so switching between them rebuilds nothing.
SUFFIX=; [ "$CUDA_COMPUTE_CAP" = 90 ] || SUFFIX=-sm$CUDA_COMPUTE_CAP
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_CUDA:-target/cuda}$SUFFIX
# For another capability, candle's quantized matmuls (a static library of machine code for
# exactly sm_<CAP>) get that capability's PTX beside the machine code, as the project's own
# kernels have: a later card (and the H100 that checks this build) JIT-compiles it at load.
# The wrapper sits beside nvcc, since candle's build finds the headers from nvcc's folder.
if [ "$CUDA_COMPUTE_CAP" != 90 ]; then
  CAP=$CUDA_COMPUTE_CAP
  NVCC=$C/bin/nvcc-ptx-too-$CAP
  printf '%s\n' '#!/usr/bin/env bash' \
    "# nvcc, adding compute_$CAP PTX to machine-code-only compilations for sm_$CAP." \
    'for a in "$@"; do' \
    "  if [ \"\$a\" = -gencode=arch=compute_$CAP,code=sm_$CAP ]; then" \
    "    exec '$C/bin/nvcc' \"\$@\" -gencode=arch=compute_$CAP,code=compute_$CAP" \
    '  fi' \
    'done' \
    "exec '$C/bin/nvcc' \"\$@\"" > "$NVCC.new"
  chmod +x "$NVCC.new"
  # A new wrapper rebuilds candle's kernels, whose build caches objects by source and flags only.
  if ! cmp -s "$NVCC.new" "$NVCC"; then
    mv "$NVCC.new" "$NVCC"
    cargo clean -q --release -p candle-kernels
  fi
  rm -f "$NVCC.new"
  export NVCC
fi

# 3. libcuda stub with every driver symbol cudarc declares (SONAME libcuda.so.1).
cargo fetch -q
CUDARC_DIR=$(cargo metadata --format-version 1 --features "$FEATURES" | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')
grep -ohE "^pub unsafe fn cu[A-Za-z0-9_]+" "$CUDARC_DIR"/src/driver/sys/*.rs | awk '{print $4}' | sort -u \
  | awk '{print "void "$1"(void){}"}' > "$TK/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$C/lib/stubs/libcuda.so" "$TK/libcuda_stub.c"

if [ -n "${CHECK:-}" ]; then
  cargo clippy --release --features "$FEATURES" --all-targets -- -D warnings
  exit
fi

# 4. Build and pack: the binary, and the GPU correctness tests as a binary of their own
#    (`cuda_parity --ignored` on the GPU machine; it is what `bench/gpu-suite.sh parity` runs).
cargo build --release --features "$FEATURES" --bin "$BIN"
B="$CARGO_TARGET_DIR/release/$BIN"
if [ "$CUDA_COMPUTE_CAP" != 90 ]; then
  # Every object of candle's kernel library must carry the PTX newer cards compile at load.
  LIB=$(ls -t "$CARGO_TARGET_DIR"/release/build/candle-kernels-*/out/libmoe.a | head -1)
  python3 "$(dirname "$0")/fatbin_kinds.py" --need-ptx "$CUDA_COMPUTE_CAP" "$LIB"
fi
T=$(cargo test --release --features "$FEATURES" --test cuda_parity --no-run --message-format=json \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])')
mkdir -p .gpu
for f in "$B" "$T"; do
  strip "$f" 2>/dev/null || true
done
xz -6 -T2 -c "$B" > ".gpu/$BIN$SUFFIX.xz"
xz -6 -T2 -c "$T" > ".gpu/cuda_parity$SUFFIX.xz"
cp "$(dirname "$0")/activate" .gpu/activate
ls -la .gpu
