"""GPU time per kernel name from an ncu or nsys log.

    ncu --csv --metrics gpu__time_duration.sum ... > ncu.csv; python3 bench/ncu_summary.py ncu.csv [N [FROM]]
    nsys stats -r cuda_gpu_trace -f csv -o t t.nsys-rep;       python3 bench/ncu_summary.py t_cuda_gpu_trace.csv [N [FROM]]

With N, N launches starting at launch FROM (default 0) are also listed one by one, in order
(one decoder layer of the fused step is 10 launches: prepare, q|k|v, rope, attention, prepare,
o, prepare, gate|up, prepare, down). An nsys trace also gives the span from the first launch's
start to the last one's end, so the GPU's idle share shows.
"""
import csv
import sys
from collections import defaultdict


def ncu_rows(lines):
    for r in csv.DictReader(l for l in lines if l.startswith('"')):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            unit = r.get("Metric Unit", "nsecond")
            v = float(r["Metric Value"].replace(",", ""))
            yield r["Kernel Name"], None, v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6}.get(unit, 1)


def nsys_rows(lines):
    # Memcpy/memset rows have names in brackets; they are GPU time too.
    for r in csv.DictReader(lines):
        yield r["Name"], float(r["Start (ns)"]), float(r["Duration (ns)"])


def main(path, first=0, start=0):
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    header = next((l for l in lines if "Duration (ns)" in l), None)
    if header is not None:
        rows = list(nsys_rows(lines[lines.index(header):]))
    else:
        rows = list(ncu_rows(lines))
    rows = [(name.split("(")[0].split("<")[0][:60], t0, ns) for name, t0, ns in rows]
    by = defaultdict(lambda: [0, 0.0])
    for name, _, ns in rows:
        by[name][0] += 1
        by[name][1] += ns
    total = sum(ns for _, _, ns in rows)
    for i, (name, _, ns) in enumerate(rows[start:start + first], start):
        print(f"#{i:<5d} {name:48s} {ns / 1e3:9.2f} us")
    print(f"{len(rows)} kernels, {total / 1e3:.1f} us of GPU time")
    if rows and rows[0][1] is not None:
        span = max(t0 + ns for _, t0, ns in rows) - min(t0 for _, t0, _ in rows)
        print(f"span {span / 1e3:.1f} us from the first launch's start to the last one's end: GPU busy {100 * total / span:.1f}%")
    for name, (n, ns) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:60s} {n:6d} launches {ns / 1e3:10.1f} us  {ns / n / 1e3:8.2f} us each  {100 * ns / total:5.1f}%")


if __name__ == "__main__":
    a = sys.argv
    main(a[1], int(a[2]) if len(a) > 2 else 0, int(a[3]) if len(a) > 3 else 0)
