#!/usr/bin/env python3
"""What GPU code each object of a static library carries: PTX and/or machine code (ELF), per
compute capability, read from the objects' .nv_fatbin sections (needs `ar` and `objcopy`).

    scripts/cuda/fatbin_kinds.py LIB.a             # one line per set of kinds, with its objects
    scripts/cuda/fatbin_kinds.py --need-ptx 86 LIB.a  # exit 1 unless every object has compute_86 PTX

scripts/cuda/build.sh runs the second form on candle's kernel library for a capability other
than 90, so a build that a newer card could not JIT never gets packed.
"""
import glob
import os
import struct
import subprocess
import sys
import tempfile

FATBIN_MAGIC = 0xBA55ED50


def kinds(obj):
    """{(kind, arch)} of one object's fat binary: kind 'PTX' or 'ELF', arch like 86."""
    with tempfile.TemporaryDirectory() as d:
        section = os.path.join(d, "fatbin")
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", obj, section], check=True, capture_output=True)
        data = open(section, "rb").read() if os.path.exists(section) else b""
    found, i = set(), 0
    while i + 16 <= len(data):
        magic, _version, header, size = struct.unpack_from("<IHHQ", data, i)
        if magic != FATBIN_MAGIC:
            break
        j, end = i + header, i + header + size
        while j < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, j)
            arch = struct.unpack_from("<I", data, j + 28)[0]
            found.add(({1: "PTX", 2: "ELF"}.get(kind, str(kind)), arch))
            j += entry_header + payload
        i = end
    return found


def main(argv):
    need = None
    if len(argv) >= 2 and argv[0] == "--need-ptx":
        need, argv = int(argv[1]), argv[2:]
    if len(argv) != 1:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["ar", "x", os.path.abspath(argv[0])], cwd=d, check=True)
        by_kinds = {}
        for obj in sorted(glob.glob(os.path.join(d, "*.o"))):
            by_kinds.setdefault(tuple(sorted(kinds(obj))), []).append(os.path.basename(obj))
    for k, objs in by_kinds.items():
        print(f"{', '.join(f'{kind} {arch}' for kind, arch in k) or 'no GPU code'}: {len(objs)} objects")
    if need is not None:
        missing = [o for k, objs in by_kinds.items() if ("PTX", need) not in k for o in objs]
        if missing:
            print(f"no compute_{need} PTX in: {', '.join(missing)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
