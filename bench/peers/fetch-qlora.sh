#!/usr/bin/env bash
# Fetch bitsandbytes for the prototype's QLoRA stack (`bench/pytorch_train.py --stack qlora`, the
# gpu-suite stage `qlora`). Run on a machine with network access, from the project root; writes
# .gpu/peers/bitsandbytes.tar.gz (git-ignored, ~2 MB): the wheel is 43 MB, mostly libraries for
# other CUDA and ROCm versions, so only the Python files and the CUDA 13.0 library are kept (the
# GPU machine's PyTorch is built for CUDA 13.0; PEFT, transformers and accelerate are already there).
#
#   bash bench/peers/fetch-qlora.sh [VERSION]     # default 0.50.2
set -euo pipefail
VERSION=${1:-0.50.2}
OUT=.gpu/peers
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp" "bitsandbytes==$VERSION"
mkdir "$tmp/site"
python3 -m zipfile -e "$tmp"/bitsandbytes-*.whl "$tmp/site"
find "$tmp/site/bitsandbytes" -name 'libbitsandbytes_*' ! -name 'libbitsandbytes_cuda130.so' -delete
tar czf "$OUT/bitsandbytes.tar.gz" -C "$tmp/site" .
ls -la "$OUT/bitsandbytes.tar.gz"
