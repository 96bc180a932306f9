#!/usr/bin/env bash
# Fetch llama.cpp's source for the side-by-side benchmarks: the `llama-cpp-python` source
# distribution from PyPI carries it in vendor/llama.cpp. Run on a machine with network access,
# from the project root; writes .gpu/peers/llama.cpp.tar.gz (git-ignored, ~12 MB: the model
# files, docs and CI folders are left out so it travels with the working tree to a GPU machine).
#
#   bash bench/peers/fetch-llamacpp.sh [VERSION]     # default 0.3.36
set -euo pipefail
VERSION=${1:-0.3.36}
OUT=.gpu/peers
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The sdist's own URL from the registry's JSON API (pip download would try to build its metadata).
python3 - "$VERSION" "$tmp/src.tar.gz" <<'PY'
import hashlib, json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1], sys.argv[2]
meta = json.load(urllib.request.urlopen("https://pypi.org/pypi/llama-cpp-python/json", timeout=60))
files = meta.get("releases", {}).get(version) or (meta["urls"] if meta["info"]["version"] == version else [])
sdist = next((u for u in files if u["packagetype"] == "sdist"), None)
assert sdist, f"no source distribution of llama-cpp-python {version} on the registry"
# A mirror may answer with addresses relative to the JSON document.
url = urllib.parse.urljoin("https://pypi.org/pypi/llama-cpp-python/json", sdist["url"])
data = urllib.request.urlopen(url, timeout=600).read()
assert hashlib.sha256(data).hexdigest() == sdist["digests"]["sha256"], "checksum mismatch"
open(dest, "wb").write(data)
print(f"llama-cpp-python {version}: {len(data) / 1e6:.1f} MB", file=sys.stderr)
PY
tar xzf "$tmp/src.tar.gz" -C "$tmp"
src=$(ls -d "$tmp"/llama_cpp_python-*/vendor/llama.cpp)
( cd "$src" && rm -rf models docs media .github benches tests examples pocs .devops )
tar czf "$OUT/llama.cpp.tar.gz" -C "$(dirname "$src")" llama.cpp
ls -la "$OUT/llama.cpp.tar.gz"
