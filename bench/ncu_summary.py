"""Summarise an `ncu --csv --metrics gpu__time_duration.sum` log: GPU time per kernel name.

    ncu --csv --metrics gpu__time_duration.sum ... > ncu.csv; python3 bench/ncu_summary.py ncu.csv [N]

With N, the first N launches are also listed one by one, in order (one decoder layer of the
fused step is 10 launches: prepare, q|k|v, rope, attention, prepare, o, prepare, gate|up,
prepare, down).
"""
import csv
import sys
from collections import defaultdict


def main(path, first=0):
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            unit = r.get("Metric Unit", "nsecond")
            v = float(r["Metric Value"].replace(",", ""))
            ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(unit, 1)
            rows.append((r["Kernel Name"].split("(")[0], ns))
    by = defaultdict(lambda: [0, 0.0])
    for name, ns in rows:
        by[name][0] += 1
        by[name][1] += ns
    total = sum(ns for _, ns in rows)
    for i, (name, ns) in enumerate(rows[:first]):
        print(f"#{i:<3d} {name:36s} {ns / 1e3:9.2f} us")
    print(f"{len(rows)} kernels, {total / 1e3:.1f} us of GPU time")
    for name, (n, ns) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:40s} {n:5d} launches {ns / 1e3:9.1f} us  {ns / n / 1e3:7.2f} us each  {100 * ns / total:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
